"""Why decode stores in_proj and the tied lm_head as (in, out): batch-1 matrix-vector products at mamba-130m shapes,
each weight in both layouts, against the time to merely read it (W.sum(), the bandwidth floor). 24 copies of each
layer weight are cycled so that they stream from memory as in a decode step. Interleaved rounds, median, thread
CPU time (robust to other processes on a shared machine).

    OMP_NUM_THREADS=1 python benchmarks/gemv_layouts.py
"""

import statistics
import time

import torch

SHAPES = {"in_proj": (3072, 768), "out_proj": (768, 1536), "x_proj": (80, 1536), "dt_proj": (1536, 48),
          "lm_head": (50280, 768)}


def main():
    torch.manual_seed(0)
    print(f"{'weight (out, in)':22s} {'(out,in) ms':>12s} {'(in,out) ms':>12s} {'read ms':>9s}  faster layout")
    for name, (out, inp) in SHAPES.items():
        copies = 1 if name == "lm_head" else 24
        weights = [torch.randn(out, inp) for _ in range(copies)]
        transposed = [w.t().contiguous() for w in weights]
        x = torch.randn(1, inp)
        fns = {"row": lambda: [x @ w.t() for w in weights], "t": lambda: [x @ w for w in transposed],
               "read": lambda: [w.sum() for w in weights]}
        times = {k: [] for k in fns}
        for _ in range(9):
            for k, fn in fns.items():
                start = time.thread_time()
                fn()
                times[k].append(time.thread_time() - start)
        ms = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        best = "(in, out)" if ms["t"] < ms["row"] else "(out, in)"
        print(f"{name + f' x{copies}':22s} {ms['row']:12.2f} {ms['t']:12.2f} {ms['read']:9.2f}  {best}")


if __name__ == "__main__":
    main()
