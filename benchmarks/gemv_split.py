"""Why decode splits few-row float32 products over threads (`hmamba.modeling_hmamba.linear`): batch-1 products at
mamba-130m shapes through nn.Linear (MKL, one thread for a single row on this project's CPUs) and through one
batched product over a block of weight rows per thread, against the time to merely read the weights (W.sum(), the
bandwidth floor). 24 copies of each layer weight are cycled so that they stream from memory as in a decode step.
Interleaved rounds, median wall time. Weights under 2**20 elements (x_proj, dt_proj) are not split: `linear` calls
the module, so their column shows only its dispatch overhead.

    python benchmarks/gemv_split.py
"""

import argparse
import statistics
import time

import torch
from torch import nn

from hmamba.modeling_hmamba import linear

SHAPES = {"in_proj": (3072, 768), "out_proj": (768, 1536), "x_proj": (80, 1536), "dt_proj": (1536, 48),
          "lm_head": (50280, 768)}


def main(rounds=15):
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; milliseconds for all copies of a weight, median of {rounds} rounds")
    print(f"{'weight (out, in)':22s} {'nn.Linear':>10s} {'linear':>8s} {'read':>8s}  {'speed-up':>8s}")
    for name, (out, inp) in SHAPES.items():
        copies = 1 if name == "lm_head" else 24
        layers = [nn.Linear(inp, out, bias=False) for _ in range(copies)]
        x = torch.randn(1, inp)
        fns = {"module": lambda: [m(x) for m in layers], "linear": lambda: [linear(m, x) for m in layers],
               "read": lambda: [m.weight.sum() for m in layers]}
        times = {k: [] for k in fns}
        with torch.no_grad():
            for _ in range(rounds):
                for k, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - start)
        ms = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        print(f"{name + f' x{copies}':22s} {ms['module']:10.2f} {ms['linear']:8.2f} {ms['read']:8.2f}  "
              f"{ms['module'] / ms['linear']:7.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default: 15)")
    main(parser.parse_args().rounds)
