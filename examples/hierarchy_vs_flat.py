"""Does hierarchy beat a flat stack of the same depth?

Trains, on the same text with the same seed, tokens, batches and parameter count:
  (a) a flat Mamba of N layers (HMamba with every layer in the L-stack and no H-stack), and
  (b) HMamba with the same N layers split into L / H / out, for each chunk_size in --chunk-sizes,
then, from a pretrained start, converts the flat model into an HMamba with chunk_size > 1 (export to the
transformers Mamba layout, `hmamba convert`) and fine-tunes it, to show how fast it recovers.

Every run is a `hmamba train` subprocess (so its peak memory, ru_maxrss, is its own). Writes results.json,
results.md (the table) and hierarchy_vs_flat.png into --out.

    bible gen1:1-rev22:21 > kjv.txt      # Debian package bible-kjv
    python examples/hierarchy_vs_flat.py --data kjv.txt --out runs/hierarchy_vs_flat
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_train(name, out, args, extra):
    """One `hmamba train` run in a subprocess; returns its train_results.json plus peak RSS and wall time."""
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "hmamba.cli", "train", str(folder), "--data", args.data, "--block-size",
           str(args.block_size), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--eval-fraction", "0.01", "--max-eval-blocks", str(args.eval_blocks), "--logging-steps", "10", *extra]
    print(f"\n=== {name}: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed: see {out / f'{name}.log'}")
    result = json.loads((folder / "train_results.json").read_text())
    result.update(name=name, peak_rss_mb=usage.ru_maxrss / 1024, wall_seconds=time.perf_counter() - start,
                  bits_per_byte=result["eval_loss"] / math.log(2))
    print(f"    held-out {result['bits_per_byte']:.4f} bits/byte, {result['tokens_per_second']:.0f} tokens/s, "
          f"peak {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def evaluate_loss(model_dir, data, block_size, eval_blocks):
    """Held-out loss of a saved model on the same held-out blocks `hmamba train` uses (no training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hmamba.data import load_documents, pack, split_blocks
    from hmamba.eval.perplexity import block_perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, held_out = split_blocks(pack(load_documents(data)[0], tokenizer, block_size), 0.01)
    return block_perplexity(model, held_out[:eval_blocks])["nll"]


def table(results):
    anchor = results[0]
    rows = ["| model | layers L/H/out | chunk | params | held-out bits/byte | tokens/s | speed vs flat | peak MB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(
            f"| {r['name']} | {r['layers']} | {r['chunk_size']} | {r['parameters']:,} | {r['bits_per_byte']:.4f} | "
            f"{r['tokens_per_second']:.0f} | {r['tokens_per_second'] / anchor['tokens_per_second']:.2f}x | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(rows)


def plot(results, finetune, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps = [h["step"] for h in r["log_history"] if "loss" in h]
        loss = [h["loss"] / math.log(2) for h in r["log_history"] if "loss" in h]
        curves.plot(steps, loss, label=f"{r['name']} ({r['bits_per_byte']:.3f})")
    if finetune:
        steps = [h["step"] for h in finetune["log_history"] if "loss" in h]
        curves.plot(steps, [h["loss"] / math.log(2) for h in finetune["log_history"] if "loss" in h], "k--",
                    label=f"flat -> chunk {finetune['chunk_size']} fine-tune ({finetune['bits_per_byte']:.3f})")
    curves.set(xlabel="step", ylabel="train loss (bits/byte)", title="training loss (held-out in legend)")
    curves.legend(fontsize=8)
    names = [r["name"] for r in results]
    bars.bar(names, [r["tokens_per_second"] for r in results], color="tab:blue")
    bars.set(ylabel="training tokens/s", title="throughput (same tokens, same parameters)")
    bars.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="training text (default: the KJV from `bible`, if installed)")
    p.add_argument("--out", default="runs/hierarchy_vs_flat", help="results folder (default: runs/hierarchy_vs_flat)")
    p.add_argument("--hidden-size", type=int, default=128, help="model width (default: 128)")
    p.add_argument("--layers", type=int, default=6, help="N, the depth of every model (default: 6)")
    p.add_argument("--split", default="2,2,2", help="L,H,out layers of the hierarchical models (default: 2,2,2)")
    p.add_argument("--chunk-sizes", default="2,4,8", help="chunk sizes to compare (default: 2,4,8)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per model (default: 150)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per step (default: 8)")
    p.add_argument("--block-size", type=int, default=256, help="tokens per block (default: 256)")
    p.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks to score (default: 64)")
    p.add_argument("--finetune-steps", type=int, default=100,
                   help="steps of fine-tuning the converted flat model (0 skips that part; default: 100)")
    p.add_argument("--finetune-chunk-size", type=int, default=4, help="chunk size of the converted model (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        from hmamba.data import kjv_text

        text = kjv_text()
        if text is None:
            sys.exit("no --data and no `bible` program: `apt-get install bible-kjv` or pass --data FILE")
        args.data = str(out / "kjv.txt")
        Path(args.data).write_text(text)
    low, high, out_layers = (int(v) for v in args.split.split(","))
    if low + high + out_layers != args.layers:
        sys.exit(f"--split {args.split} has {low + high + out_layers} layers, not --layers {args.layers}")

    common = ["--set", f"hidden_size={args.hidden_size}", "--max-steps", str(args.steps)]
    runs = [("flat", args.layers, 0, 0, 1)] + [(f"hmamba-c{c}", low, high, out_layers, int(c))
                                               for c in args.chunk_sizes.split(",")]
    results = []
    for name, nl, nh, no, chunk in runs:
        config = ["--set", f"num_low_layers={nl}", "--set", f"num_high_layers={nh}", "--set",
                  f"num_out_layers={no}", "--set", f"chunk_size={chunk}"]
        r = run_train(name, out, args, common + config)
        r.update(layers=f"{nl}/{nh}/{no}", chunk_size=chunk)
        results.append(r)

    finetune = None
    if args.finetune_steps:
        from hmamba.conversion import convert, export

        flat_hf, converted = out / "flat-as-mamba-hf", out / f"flat-to-c{args.finetune_chunk_size}"
        export(str(out / "flat"), str(flat_hf), layout="hf", overwrite=True)
        convert(str(flat_hf), str(converted), low_layers=low, out_layers=out_layers,
                chunk_size=args.finetune_chunk_size, overwrite=True)
        shutil.copy(out / "flat" / "tokenizer_config.json", converted / "tokenizer_config.json")
        before = evaluate_loss(converted, args.data, args.block_size, args.eval_blocks)
        finetune = run_train(f"flat-to-c{args.finetune_chunk_size}-finetuned", out, args,
                             ["--model", str(converted), "--max-steps", str(args.finetune_steps), "--lr", "1e-3"])
        finetune.update(chunk_size=args.finetune_chunk_size, before_bits_per_byte=before / math.log(2))

    flat = results[0]
    lines = [
        f"# hierarchy vs flat on {Path(args.data).name}",
        "",
        f"Every model: {args.layers} Mamba layers, {args.hidden_size} wide, byte-level tokenizer, {args.steps} steps of "
        f"{args.batch_size} x {args.block_size} tokens (seed {args.seed}); held-out = the last 1% of the text "
        f"({args.eval_blocks} blocks). Peak memory is the training process's max RSS.",
        "",
        table(results),
    ]
    if finetune:
        lines += [
            "",
            f"From a pretrained start: the flat model converted to L/H/out = {low}/{high}/{out_layers}, chunk_size "
            f"{args.finetune_chunk_size} (`hmamba export` + `hmamba convert`): {finetune['before_bits_per_byte']:.4f} "
            f"bits/byte before fine-tuning, {finetune['bits_per_byte']:.4f} after {args.finetune_steps} steps "
            f"(flat: {flat['bits_per_byte']:.4f}).",
        ]
    report = "\n".join(lines) + "\n"
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"runs": results, "finetune": finetune}, indent=1))
    plot(results, finetune, out / "hierarchy_vs_flat.png")
    print("\n" + report + f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'hierarchy_vs_flat.png'}")


if __name__ == "__main__":
    main()
