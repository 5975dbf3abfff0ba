"""Loaders and scoring for the offline tasks (lm-eval imports this file through `!function` in the YAMLs).

The data are small jsonl files next to this module (built by scripts/build_eval_data.py), so the tasks need
no Hub access."""

import json
import re
from pathlib import Path

DATA = Path(__file__).parent / "data"


def _split(name, split):
    import datasets

    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {split: datasets.Dataset.from_list(rows)}


def lastword(**kwargs):
    return _split("lastword.jsonl", "test")


def arc_easy(**kwargs):
    return _split("arc_easy.jsonl", "validation")


def sonnets(**kwargs):
    return _split("sonnets.jsonl", "test")


def rolling_results(doc, results):
    """Word / byte perplexity and bits per byte of a whole document (as lm-eval's wikitext task)."""
    (loglikelihood,) = results
    words, nbytes = len(re.split(r"\s+", doc["text"].strip())), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
