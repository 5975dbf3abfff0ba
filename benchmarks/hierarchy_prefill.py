"""Does the hierarchy pay in prefill? chunk_size 4 over chunk_size 1 (L = H = 12 layers, mamba-130m shapes, the same
weights), paired in interleaved rounds, for three ways to run a prompt of T tokens:

- logits at every position (what `hmamba bench` times, and the speed issue's prefill): the 50280-wide lm_head costs
  the same for both chunk sizes, about 30% of the FLOPs, so by FLOPs alone s=4 costs 0.74x of s=1 here;
- logits at the last position only (generate()'s prefill, `logits_to_keep=1`);
- the backbone alone (no lm_head).

Each cell: median over rounds of the per-round ratio (s=4 time / s=1 time), and s=1's median seconds.

    python benchmarks/hierarchy_prefill.py --lengths 512,1024,2048,4096 --rounds 5
"""

import argparse
import statistics
import time

import torch

from hmamba.eval.bench import PRESETS, anchor_model, hmamba_from_anchor

WAYS = {
    "all logits": lambda m, ids: m(ids, use_cache=False),
    "last logits": lambda m, ids: m(ids, use_cache=False, logits_to_keep=1),
    "backbone": lambda m, ids: m.backbone(ids, use_cache=False),
}


@torch.no_grad()
def main(lengths=(512, 1024, 2048, 4096), rounds=5):
    p = PRESETS["130m"]
    anchor = anchor_model(p["vocab"], p["width"], p["layers"])
    models = {s: hmamba_from_anchor(anchor, s).eval() for s in (1, 4)}
    print(f"{torch.get_num_threads()} threads, float32; ratio = s=4 time / s=1 time, median of {rounds} paired rounds")
    print("| T | " + " | ".join(f"{w}: s=4/s=1 (s=1 s)" for w in WAYS) + " |\n|---|" + "---|" * len(WAYS))
    for length in lengths:
        ids = torch.randint(0, p["vocab"], (1, length))
        fns = {(w, s): (lambda f=f, m=m: f(m, ids)) for w, f in WAYS.items() for s, m in models.items()}
        for fn in fns.values():
            fn()
        times = {k: [] for k in fns}
        for r in range(rounds):
            for k, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
            print(f"  T={length}: round {r + 1}/{rounds}", flush=True)
        cells = []
        for w in WAYS:
            ratio = statistics.median(b / a for a, b in zip(times[w, 1], times[w, 4]))
            cells.append(f"{ratio:.2f}x ({statistics.median(times[w, 1]):.2f} s)")
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="prompt lengths, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per length (default: 5)")
    args = parser.parse_args()
    main(tuple(int(t) for t in args.lengths.split(",")), args.rounds)
