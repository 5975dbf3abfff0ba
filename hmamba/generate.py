"""Text generation with an HMamba model: the library side of `hmamba generate`."""

import json
import os
import tempfile
import time
from importlib import resources

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

from .configuration_hmamba import HMambaConfig
from .modeling_hmamba import HMambaForCausalLM

DEFAULT_CONFIG = "tiny"


def builtin_config(name=DEFAULT_CONFIG):
    """An HMambaConfig shipped inside the package (hmamba/configs/NAME.json)."""
    path = resources.files("hmamba") / "configs" / f"{name}.json"
    if not path.is_file():
        names = sorted(p.name[:-5] for p in (resources.files("hmamba") / "configs").iterdir())
        raise ValueError(f"no built-in config {name!r}: choose one of {names}")
    return HMambaConfig(**json.loads(path.read_text()))


def build_default_model(save_dir, config_name=DEFAULT_CONFIG, seed=0):
    """Build the embedded default (a small HMamba with a byte-level tokenizer that needs no download) and save
    it to `save_dir` as a complete, trust_remote_code-loadable folder. Returns the list of files written."""
    torch.manual_seed(seed)
    model = HMambaForCausalLM(builtin_config(config_name))
    tokenizer = ByT5Tokenizer(extra_ids=0)
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return sorted(os.listdir(save_dir))


def load(model_path, device="cpu", dtype="float32"):
    """Model and tokenizer from a folder or Hub id, through the Auto classes."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
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
    """`hmamba generate`: with no model, build the embedded default, save it, load it back through
    AutoModelForCausalLM and generate with it."""
    if model_path is None:
        save_dir = save_dir or tempfile.mkdtemp(prefix="hmamba-tiny-")
        files = build_default_model(save_dir)
        print(f"built the embedded default HMamba ({DEFAULT_CONFIG}) and saved it to {save_dir}: {', '.join(files)}")
        model_path = save_dir
    device, dtype = generate_kwargs.pop("device", "cpu"), generate_kwargs.pop("dtype", "float32")
    model, tokenizer = load(model_path, device=device, dtype=dtype)
    c = model.config
    print(
        f"loaded {type(model).__name__} from {model_path}: {model.num_parameters():,} parameters, "
        f"L={c.num_low_layers} H={c.num_high_layers} out={c.num_out_layers} layers, chunk_size={c.chunk_size}, "
        f"pooling={c.pooling}, {dtype} on {device}"
    )
    texts, tokens, seconds = generate_text(model, tokenizer, list(prompts), **generate_kwargs)
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r} ->\n{prompt}{text}")
    print(f"summary: {tokens} new tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)")
    return texts
