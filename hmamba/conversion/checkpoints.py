"""Pretrained Mamba checkpoints into HMamba's L, H and out stacks, and HMamba (chunk_size=1) back to Mamba.

Two source layouts are detected from the files:
  * mamba_ssm (state-spaces/mamba-*): config.json with d_model, n_layer, ssm_cfg, ...; pytorch_model.bin with
    backbone.embedding.weight, backbone.layers.{i}.{norm,mixer.*}, backbone.norm_f.weight, lm_head.weight;
  * transformers -hf (MambaForCausalLM, model_type "mamba"): backbone.embeddings.weight, same layer names,
    safetensors (possibly sharded) or pytorch_model.bin.
Layer i of the flat stack goes to the L-stack for i < K, to the out layers for the last M, to the H-stack between.
"""

import json
import os
import re
import shlex
import shutil
import zipfile
from pathlib import Path

import torch

from ..atomic import atomic_output_dir
from ..configuration_hmamba import HMambaConfig
from ..data import load_tokenizer
from ..hub import HUB_ID, write_model_card

TOKENIZER_FILE = re.compile(r"^(tokenizer.*|special_tokens_map\.json|vocab\.(json|txt)|merges\.txt|.*\.model|"
                             r"added_tokens\.json)$")
GENERATION_CONFIG = "generation_config.json"  # copied with the tokenizer files, its ids those of the tokenizer
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")
STACK_KEY = re.compile(r"^backbone\.(low_layers|high_layers|out_layers)\.(\d+)\.(.+)$")
# fields that mean the same in transformers' MambaConfig and HMambaConfig
SHARED_CONFIG_KEYS = ("vocab_size", "hidden_size", "hidden_act", "state_size", "conv_kernel", "expand",
                      "time_step_rank", "use_conv_bias", "use_bias", "residual_in_fp32", "layer_norm_epsilon",
                      "time_step_scale", "time_step_min", "time_step_max", "time_step_init_scheme", "time_step_floor",
                      "pad_token_id", "bos_token_id", "eos_token_id")


class CheckpointError(ValueError):
    """A source checkpoint that cannot be converted; the message names the problem."""


def stack_offsets(config):
    """Index in the flat layer list of each stack's first layer: L, then H, then out."""
    return {"low_layers": 0, "high_layers": config.num_low_layers,
            "out_layers": config.num_low_layers + config.num_high_layers}


def stack_key(config, i, name):
    """The HMamba key of parameter `name` of flat layer i (layers 0.. fill L, then H, then out)."""
    stack, start = next((k, v) for k, v in reversed(stack_offsets(config).items()) if i >= v)  # empty stacks skip
    return f"backbone.{stack}.{i - start}.{name}"


# ---------------------------------------------------------------------------------------------------------
# reading


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; download it again") from e


def check_out(src, out):
    """OUT must not be SRC or a folder holding it: --overwrite would delete the source."""
    src, out = os.path.realpath(src), os.path.realpath(out)
    if src == out or src.startswith(out.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"{out} holds the source checkpoint {src}: writing there would delete the source; "
                              "choose another output folder")


def resolve_source(src):
    """A local folder, or a Hub id downloaded with huggingface_hub (a clear error when offline)."""
    if os.path.isdir(src):
        return Path(src)
    if os.path.exists(src):
        raise CheckpointError(f"{src} is a file: give the checkpoint's folder (with config.json and weights)")
    if not HUB_ID.match(src):
        raise CheckpointError(f"{src} is neither a local folder nor a Hugging Face Hub id")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
        return Path(snapshot_download(src, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, no network: all end the same way for the user
        raise CheckpointError(
            f"{src} is not a local folder and could not be downloaded from the Hugging Face Hub "
            f"({type(e).__name__}: {' '.join(str(e).split())}). Offline? Download it where the Hub is reachable "
            f"(huggingface-cli download {src} --local-dir DIR) and convert DIR."
        ) from e


def load_state_dict(folder):
    """All tensors of a checkpoint folder: safetensors first (single or sharded), else .bin with
    weights_only=True (a pickle that would run code is refused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    for index_name, loader in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
        if (folder / index_name).exists():
            files = sorted(set(read_json(folder / index_name)["weight_map"].values()))
            break
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").exists() else ["pytorch_model.bin"]
    state = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{folder} has no weights: expected {name} (model.safetensors or pytorch_model.bin)")
        try:
            if name.endswith(".safetensors"):
                part = load_file(path)
            else:
                # mmap reads only the zip format of torch >= 1.6; older (legacy) files load whole
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except (SafetensorError, RuntimeError, OSError, EOFError) as e:
            raise CheckpointError(f"cannot read {path}: {e}. Is the file truncated or corrupted?") from e
        except Exception as e:  # torch.load(weights_only=True) refusing a pickle that would run code
            raise CheckpointError(f"refusing to load {path}: {e}") from e
        state.update(part)
    return state


def read_mamba(folder):
    """(hmamba config kwargs of the flat model, layout name, layers [{name: tensor}], embedding, norm_f, lm_head)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder} is not a Mamba checkpoint: it has no config.json")
    cfg = read_json(config_path)
    if "d_model" in cfg and "n_layer" in cfg:
        layout, kwargs = "mamba_ssm", _from_mamba_ssm_config(cfg)
        embedding_key = "backbone.embedding.weight"
    elif cfg.get("model_type") == "mamba":
        layout, kwargs = "hf", _from_hf_config(cfg)
        embedding_key = "backbone.embeddings.weight"
    elif cfg.get("model_type") == "hmamba":
        raise CheckpointError(f"{folder} is already an HMamba checkpoint: load it with from_pretrained")
    else:
        raise CheckpointError(
            f"{folder}/config.json is neither a mamba_ssm config (d_model, n_layer) nor a transformers Mamba "
            f"config (model_type 'mamba'); it has model_type={cfg.get('model_type')!r}"
        )
    state = load_state_dict(folder)
    n_layer = kwargs.pop("num_layers")
    layers = [{} for _ in range(n_layer)]
    rest = {}
    for key, tensor in state.items():
        m = LAYER_KEY.match(key)
        if m and int(m.group(1)) < n_layer:
            layers[int(m.group(1))][m.group(2)] = tensor
        else:
            rest[key] = tensor
    if embedding_key not in rest and embedding_key.removeprefix("backbone.") in state:
        raise CheckpointError(f"{folder} holds a MambaModel (its keys lack the 'backbone.' prefix): convert a "
                              "MambaForCausalLM checkpoint (MambaForCausalLM.from_pretrained(folder).save_pretrained)")
    for name in (embedding_key, "backbone.norm_f.weight"):
        if name not in rest:
            raise CheckpointError(f"{folder}: missing key {name} ({layout} layout)")
    embedding, norm_f = rest.pop(embedding_key), rest.pop("backbone.norm_f.weight")
    lm_head = rest.pop("lm_head.weight", None)
    if rest:
        raise CheckpointError(f"{folder}: unexpected keys for a {n_layer}-layer Mamba: {sorted(rest)[:8]}")
    if kwargs["tie_word_embeddings"] and lm_head is not None and not torch.equal(lm_head, embedding):
        raise CheckpointError(f"{folder}: the config ties embeddings but lm_head.weight differs from the embedding")
    if not kwargs["tie_word_embeddings"] and lm_head is None:
        raise CheckpointError(f"{folder}: untied embeddings but no lm_head.weight")
    if embedding.shape[0] != kwargs["vocab_size"]:
        raise CheckpointError(
            f"{folder}: the embedding has {embedding.shape[0]} rows but the config implies vocab_size "
            f"{kwargs['vocab_size']} (shape mismatch)"
        )
    return kwargs, layout, layers, embedding, norm_f, lm_head


def _from_mamba_ssm_config(cfg):
    ssm = dict(cfg.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise CheckpointError(f"ssm_cfg.layer={ssm['layer']!r}: only Mamba1 checkpoints convert (not Mamba2)")
    if not cfg.get("rms_norm", True):
        raise CheckpointError("rms_norm=false (LayerNorm) checkpoints are not supported: HMamba uses RMSNorm")
    if cfg.get("attn_layer_idx"):
        raise CheckpointError("hybrid checkpoints with attention layers (attn_layer_idx) are not supported")
    if cfg.get("d_intermediate"):
        raise CheckpointError(f"d_intermediate={cfg['d_intermediate']}: checkpoints with an MLP after each mixer are "
                              "not supported (HMamba blocks are Mamba mixers only)")
    multiple = cfg.get("pad_vocab_size_multiple", 8)
    vocab = cfg.get("vocab_size", 50277)  # mamba_ssm's MambaConfig defaults
    vocab += (multiple - vocab % multiple) % multiple
    return dict(
        num_layers=cfg["n_layer"],
        vocab_size=vocab,
        hidden_size=cfg["d_model"],
        state_size=ssm.get("d_state", 16),
        conv_kernel=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        time_step_rank=ssm.get("dt_rank", "auto"),
        use_conv_bias=ssm.get("conv_bias", True),
        use_bias=ssm.get("bias", False),
        residual_in_fp32=cfg.get("residual_in_fp32", True),
        layer_norm_epsilon=cfg.get("norm_epsilon", 1e-5),
        tie_word_embeddings=cfg.get("tie_embeddings", True),
        pad_token_id=1, bos_token_id=0, eos_token_id=0,  # GPT-NeoX ids, the tokenizer of state-spaces/mamba-*
    )


def _from_hf_config(cfg):
    from transformers import MambaConfig

    try:  # a field config.json leaves out takes transformers' default, as with AutoConfig
        hf = MambaConfig.from_dict(cfg)
    except Exception as e:  # noqa: BLE001  (transformers' strict config checks raise several kinds)
        raise CheckpointError(f"the transformers Mamba config.json does not load: {e}") from e
    kwargs = {k: getattr(hf, k) for k in SHARED_CONFIG_KEYS}
    kwargs["num_layers"] = hf.num_hidden_layers
    kwargs["tie_word_embeddings"] = hf.tie_word_embeddings
    return kwargs


# ---------------------------------------------------------------------------------------------------------
# writing


def _progress(iterable, desc, total):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="layer", disable=total < 8)


def convert(src, out, low_layers=None, out_layers=0, chunk_size=1, pooling="last", dtype=None, overwrite=False,
            tokenizer=None, base_model=None, repo_id=None):
    """Convert a pretrained Mamba checkpoint (mamba_ssm or transformers -hf layout, local or Hub) to HMamba.

    Layers 0..low_layers-1 become the L-stack, the last `out_layers` the out layers, the rest the H-stack.
    chunk_size=1 reproduces the source model exactly; chunk_size>1 changes what the H layers see (chunk
    summaries instead of every token), so the result needs fine-tuning. Returns a summary dict.

    OUT also gets the source's tokenizer files, or those of `tokenizer` (a folder or Hub id; mamba_ssm checkpoints
    ship none), and a model card (README.md) naming `base_model` (default: SRC when it is a Hub id) and the
    equivalent `hmamba convert` command, with `repo_id` (default: OUT's name) in its loading example.
    """
    folder = resolve_source(src)
    check_out(folder, out)
    if base_model is not None and not HUB_ID.match(base_model):  # checked before the work, not when writing the card
        raise CheckpointError(f"--base-model {base_model!r} is not a Hugging Face Hub id (owner/name)")
    kwargs, layout, layers, embedding, norm_f, lm_head = read_mamba(folder)
    n = len(layers)
    low_layers = (n - out_layers) // 2 if low_layers is None else low_layers
    if not 0 <= out_layers < n:
        raise CheckpointError(
            f"--out-layers {out_layers} is out of range: the checkpoint has {n} layers and at least one must stay in "
            f"the L or H stack (0..{n - 1})"
        )
    if not 0 <= low_layers <= n - out_layers:
        raise CheckpointError(
            f"--low-layers {low_layers} is out of range: with {n} layers and --out-layers {out_layers} it must be "
            f"in 0..{n - out_layers}"
        )
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    token_ids = {}  # the special-token ids of config.json and generation_config.json
    if tokenizer is not None:
        try:
            tokenizer = load_tokenizer(tokenizer)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        # the source's ids describe its own tokenizer; one this tokenizer lacks (GPT-NeoX: no pad) keeps the source's
        token_ids = {k: getattr(tokenizer, k) for k in TOKEN_IDS if getattr(tokenizer, k) is not None}
    config = HMambaConfig(
        **{**kwargs, **token_ids}, num_low_layers=low_layers, num_high_layers=n - low_layers - out_layers,
        num_out_layers=out_layers, chunk_size=chunk_size, pooling=pooling,
    )
    target = DTYPES[dtype] if dtype else embedding.dtype
    out_name = Path(os.path.abspath(out)).name  # also for "."
    command = ["hmamba", "convert", str(src), out_name, "--low-layers", str(low_layers), "--out-layers",
               str(out_layers), "--chunk-size", str(chunk_size), "--pooling", pooling]
    command += ["--dtype", dtype] if dtype else []
    command += ["--tokenizer", str(tokenizer.name_or_path)] if tokenizer is not None else []
    state = {"backbone.embeddings.weight": embedding, "backbone.norm_f.weight": norm_f}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = lm_head
    for i, params in enumerate(_progress(layers, f"mapping {n} layers", n)):
        for name, tensor in params.items():
            state[stack_key(config, i, name)] = tensor
    state = {k: v.to(target) for k, v in state.items()}

    with atomic_output_dir(out, overwrite) as tmp:
        save_hmamba(config, state, tmp, torch_dtype=target)
        for f in sorted(folder.iterdir()):  # --tokenizer replaces the source's tokenizer files
            if f.is_file() and tokenizer is None and TOKENIZER_FILE.match(f.name):
                shutil.copy2(f, tmp / f.name)
        if (folder / GENERATION_CONFIG).is_file():
            generation = {**read_json(folder / GENERATION_CONFIG), **token_ids}
            (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_model_card(tmp, base_model=base_model or (None if os.path.isdir(src) else str(src)),
                         command=shlex.join(command), repo_id=repo_id or out_name)
        files = sorted(p.name for p in tmp.iterdir())
    summary = dict(
        source=str(src), layout=layout, out=str(out), parameters=sum(t.numel() for t in state.values()),
        layers=dict(low=low_layers, high=config.num_high_layers, out=out_layers), chunk_size=chunk_size,
        pooling=pooling, dtype=str(target).replace("torch.", ""), exact=config.is_flat, files=files,
    )
    return summary


def save_hmamba(config, state, folder, torch_dtype=torch.float32):
    """Save an HMamba state dict as a from_pretrained folder (safetensors, config with auto_map, model code),
    checking every key and shape against the model the config describes."""
    from ..modeling_hmamba import HMambaForCausalLM

    with torch.device("meta"):
        model = HMambaForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"key mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointError(f"shape mismatch for {k}: checkpoint {tuple(state[k].shape)}, model {tuple(shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.config.dtype = torch_dtype
    model.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# export


def export(src, out, layout="hf", overwrite=False):
    """Write an HMamba checkpoint with chunk_size=1 as a flat Mamba in the transformers -hf layout
    (MambaForCausalLM, safetensors) or the original mamba_ssm layout (config.json + pytorch_model.bin)."""
    folder = Path(src)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder} is not an HMamba checkpoint: it has no config.json")
    check_out(folder, out)
    cfg = read_json(config_path)
    if cfg.get("model_type") != "hmamba":
        raise CheckpointError(f"{folder}/config.json has model_type={cfg.get('model_type')!r}, not 'hmamba'")
    config = HMambaConfig.from_pretrained(folder)
    if not config.is_flat:
        raise CheckpointError(
            f"{folder} has chunk_size={config.chunk_size} and H layers: only chunk_size=1 (or no H layers) is a flat "
            "Mamba and can be exported"
        )
    if layout not in ("hf", "mamba_ssm"):
        raise CheckpointError(f"--layout {layout!r} is not one of ('hf', 'mamba_ssm')")
    if layout == "mamba_ssm" and config.layer_norm_epsilon != 1e-5:
        raise CheckpointError(f"layer_norm_epsilon={config.layer_norm_epsilon}: mamba_ssm's config has no such field "
                              "(its models always use 1e-5), so that layout would compute another function: use "
                              "--layout hf")
    state = load_state_dict(folder)
    layers = {}
    offsets = stack_offsets(config)
    for key, tensor in state.items():
        m = STACK_KEY.match(key)
        if m:
            layers[f"backbone.layers.{offsets[m.group(1)] + int(m.group(2))}.{m.group(3)}"] = tensor
    embedding, norm_f = state["backbone.embeddings.weight"], state["backbone.norm_f.weight"]
    lm_head = state.get("lm_head.weight", embedding)
    head = 0 if config.tie_word_embeddings else lm_head.numel()

    with atomic_output_dir(out, overwrite) as tmp:
        if layout == "hf":
            _write_hf(config, layers, embedding, norm_f, lm_head, tmp)
        else:
            _write_mamba_ssm(config, layers, embedding, norm_f, lm_head, tmp)
        for f in sorted(folder.iterdir()):
            wanted = TOKENIZER_FILE.match(f.name) or f.name == GENERATION_CONFIG
            if wanted and f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        files = sorted(p.name for p in tmp.iterdir())
    return dict(source=str(src), out=str(out), layout=layout, layers=config.num_hidden_layers, files=files,
                parameters=sum(t.numel() for t in layers.values()) + embedding.numel() + norm_f.numel() + head)


def _write_hf(config, layers, embedding, norm_f, lm_head, folder):
    from transformers import MambaConfig, MambaForCausalLM

    keys = SHARED_CONFIG_KEYS + ("tie_word_embeddings",)
    mamba_config = MambaConfig(num_hidden_layers=config.num_hidden_layers, **{k: getattr(config, k) for k in keys})
    with torch.device("meta"):
        model = MambaForCausalLM(mamba_config)
    state = dict(layers, **{"backbone.embeddings.weight": embedding, "backbone.norm_f.weight": norm_f})
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = lm_head
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.config.dtype = embedding.dtype
    model.save_pretrained(folder)


def _write_mamba_ssm(config, layers, embedding, norm_f, lm_head, folder):
    multiple = 8 if config.vocab_size % 8 == 0 else 1
    cfg = dict(
        d_model=config.hidden_size, d_intermediate=0, n_layer=config.num_hidden_layers, vocab_size=config.vocab_size,
        ssm_cfg=dict(d_state=config.state_size, d_conv=config.conv_kernel, expand=config.expand,
                     dt_rank=config.time_step_rank, conv_bias=config.use_conv_bias, bias=config.use_bias),
        attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=config.residual_in_fp32,
        fused_add_norm=True, pad_vocab_size_multiple=multiple, tie_embeddings=config.tie_word_embeddings,
    )
    state = dict(layers, **{"backbone.embedding.weight": embedding, "backbone.norm_f.weight": norm_f,
                            "lm_head.weight": lm_head})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.save({k: v.contiguous() for k, v in state.items()}, folder / "pytorch_model.bin")


def format_summary(summary):
    lines = [f"{k}: {v}" for k, v in summary.items() if k != "files"]
    lines.append(f"files: {', '.join(summary['files'])}")
    if not summary.get("exact", True):
        lines.append(
            "note: chunk_size > 1 feeds the H layers chunk summaries instead of every token, which their "
            "pretrained weights never saw: fine-tune before use (hmamba train)."
        )
    return "\n".join(lines)

