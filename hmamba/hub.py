"""Hugging Face Hub: model cards and uploads of complete HMamba folders.

A complete folder loads for someone who does not have hmamba installed (`trust_remote_code=True`):

    model.safetensors (or sharded, with its index)   config.json with auto_map   generation_config.json
    modeling_hmamba.py   configuration_hmamba.py     tokenizer files             README.md (model card)

`model.save_pretrained` writes the first five (hmamba registers its classes for the Auto classes), the tokenizer's
`save_pretrained` the tokenizer files, and `write_model_card` the card. `push_folder_to_hub` checks a folder is
complete before it uploads it in one commit; `push_to_hub` does all of it for a model and tokenizer in memory.
(`model.push_to_hub(repo)`, transformers' own, uploads a loadable repo too, but with transformers' generic card and
no tokenizer.)
"""

import json
import re
import tempfile
from pathlib import Path

import torch

from .atomic import atomic_write
from .configuration_hmamba import HMambaConfig
from .modeling_hmamba import AUTO_MAP, TRANSFORMERS_REQUIREMENT, HMambaForCausalLM

CODE_FILES = ("modeling_hmamba.py", "configuration_hmamba.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # either is enough to load the tokenizer
# what a folder needs to load from the Hub (AutoModel, added by newer saves, is optional)
REQUIRED_AUTO_MAP = {k: AUTO_MAP[k] for k in ("AutoConfig", "AutoModelForCausalLM")}
TAGS = ["hmamba", "mamba", "ssm", "hierarchical", "custom_code"]
HUB_ID = re.compile(r"^\w[\w.-]*(/\w[\w.-]*)?$")  # name or owner/name; neither starts with "." or "-" (not ./path)


def model_card(config, *, repo_id, base_model=None, datasets=None, command=None, notes=None, license="apache-2.0",
               num_parameters=None):
    """The text of README.md (YAML metadata, then markdown) for an HMamba model with this config."""
    from huggingface_hub import ModelCardData

    for name in [base_model] + list(datasets or []):
        if name is not None and not HUB_ID.match(name):
            raise ValueError(f"{name!r} is not a Hugging Face Hub id (owner/name): the card's metadata links to it")
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license=license, tags=TAGS,
        base_model=base_model, datasets=list(datasets) if datasets else None,
    )
    c = config
    layers = c.num_low_layers + c.num_high_layers + c.num_out_layers
    rows = [
        ("L-stack (token rate)", _layers(c.num_low_layers)),
        ("H-stack (chunk rate)", f"{_layers(c.num_high_layers)}, one step per chunk of {c.chunk_size} tokens"),
        ("out layers (token rate)", _layers(c.num_out_layers)),
        ("chunk size / pooling", f"{c.chunk_size} / {c.pooling}"),
        ("hidden size / state size / expand", f"{c.hidden_size} / {c.state_size} / {c.expand}"),
        ("vocabulary", str(c.vocab_size)),
    ]
    if num_parameters is not None:
        rows.append(("parameters", f"{num_parameters:,}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)

    if base_model and datasets:
        made = f"Fine-tuned from [{base_model}](https://huggingface.co/{base_model}) on {_links(datasets)}."
    elif base_model:
        made = f"Converted from the pretrained Mamba [{base_model}](https://huggingface.co/{base_model})."
        if c.is_flat:
            made += " It computes exactly what the original model computes (chunk_size 1, or no H layers)."
        else:
            made += (f" With chunk_size {c.chunk_size} the H layers see one summary per chunk instead of every token, "
                     "which their pretrained weights never saw: fine-tune before use.")
    elif datasets:
        made = f"Trained from scratch on {_links(datasets)}."
    else:
        made = "Built with hmamba."
    if notes:
        made += f"\n\n{notes}"
    if command:
        made += f"\n\nMade with:\n\n```bash\n{command}\n```"

    body = f"""
# {repo_id.split("/")[-1]}

A hierarchical Mamba (HMamba) causal language model. The residual stream passes an L-stack of Mamba blocks at
token rate, is causally pooled into chunks of {c.chunk_size} tokens, passes an H-stack of Mamba blocks at chunk
rate, and every token receives the H update of the last chunk complete at that token (no future leaks); token-rate
out layers follow. {layers} Mamba layers in all; with chunk_size 1 the model is exactly a flat Mamba.

| | |
|---|---|
{table}

## How it was made

{made}

## How to load it

Needs torch and {TRANSFORMERS_REQUIREMENT}; the model code ships in this repository:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
inputs = tokenizer("In the beginning", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
```

or, with the hmamba package (`pip install hmamba`): `hmamba generate --model {repo_id}`.
Generation keeps a constant-size recurrent cache (see `HMambaCache` in `modeling_hmamba.py`).
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _layers(n):
    return f"{n} Mamba layer{'' if n == 1 else 's'}"


def _links(datasets):
    return ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets)


def write_model_card(folder, *, base_model=None, datasets=None, command=None, notes=None, license="apache-2.0",
                     repo_id=None):
    """Write README.md (the model card) into a saved HMamba folder; returns its path.

    base_model: Hub id of the checkpoint it was converted or fine-tuned from (goes into the metadata).
    datasets: Hub ids of the datasets it was trained on (metadata). notes: free markdown on how it was made (e.g.
    training data that is not on the Hub, steps, final loss). command: the command line that made it.
    repo_id: the id the card's loading example uses (default: the folder's name).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model there first (model.save_pretrained)")
    config = HMambaConfig.from_pretrained(folder)
    with torch.device("meta"):
        num_parameters = HMambaForCausalLM(config).num_parameters()
    text = model_card(config, repo_id=repo_id or folder.resolve().name, base_model=base_model, datasets=datasets,
                      command=command, notes=notes, license=license, num_parameters=num_parameters)
    path = folder / "README.md"
    with atomic_write(path, encoding="utf-8") as f:
        f.write(text)
    return path


def check_hub_folder(folder):
    """The files of a complete, upload-ready HMamba folder (sorted, relative paths); ValueError naming whatever is
    missing and how to add it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    problems = []
    if "config.json" not in files:
        problems.append("config.json (model.save_pretrained writes it)")
    else:
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "hmamba":
            problems.append(f"an HMamba config.json (it has model_type={config.get('model_type')!r})")
        elif {k: v for k, v in (config.get("auto_map") or {}).items() if k in REQUIRED_AUTO_MAP} != REQUIRED_AUTO_MAP:
            problems.append(f"auto_map {REQUIRED_AUTO_MAP} in config.json (import hmamba before save_pretrained)")
    if not {"model.safetensors", "model.safetensors.index.json"} & set(files):
        problems.append("safetensors weights (model.safetensors; model.save_pretrained writes it)")
    problems += [f"{name} (import hmamba before save_pretrained)" for name in CODE_FILES if name not in files]
    if not set(TOKENIZER_FILES) & set(files):
        problems.append("tokenizer files (tokenizer.save_pretrained(folder), or hmamba convert --tokenizer)")
    if "generation_config.json" not in files:
        problems.append("generation_config.json (model.save_pretrained writes it)")
    if "README.md" not in files:
        problems.append("README.md (hmamba.hub.write_model_card(folder, ...))")
    if problems:
        raise ValueError(f"{folder} is not ready for the Hub; it lacks: " + "; ".join(problems))
    return files


def check_repo_id(repo_id):
    if not HUB_ID.match(repo_id) or "/" not in repo_id:
        raise ValueError(f"{repo_id!r} is not a Hub repo id: use OWNER/NAME, e.g. your-name/hmamba-130m")


class UploadError(ValueError):
    """The Hub refused or could not be reached (network, authentication, permissions): the folder was fine."""


def push_folder_to_hub(folder, repo_id, *, private=False, token=None, commit_message="Upload HMamba model",
                       revision=None, create_pr=False):
    """Upload a complete HMamba folder (see check_hub_folder) to the model repo `repo_id` in one commit, creating
    the repo if needed. Returns huggingface_hub's CommitInfo (its .commit_url links to the commit). A failure of
    the upload itself raises UploadError naming what huggingface_hub raised."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)
    files = check_hub_folder(folder)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(Path(folder) / f)) for f in files]
    try:
        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        return api.create_commit(repo_id, operations, commit_message=commit_message, token=token, revision=revision,
                                 create_pr=create_pr)
    except Exception as e:  # noqa: BLE001  (huggingface_hub's HTTP, auth and offline errors are of many kinds)
        raise UploadError(f"upload to {repo_id} failed ({type(e).__name__}: {e})") from e


def push_to_hub(model, tokenizer, repo_id, *, base_model=None, datasets=None, command=None, notes=None,
                license="apache-2.0", private=False, token=None, commit_message="Upload HMamba model"):
    """Save `model` and `tokenizer` with a model card to a temporary folder and upload it (push_folder_to_hub)."""
    with tempfile.TemporaryDirectory(prefix="hmamba-hub-") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_model_card(folder, base_model=base_model, datasets=datasets, command=command, notes=notes,
                         license=license, repo_id=repo_id)
        return push_folder_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message)
