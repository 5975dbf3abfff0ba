"""Side-by-side speed of HMamba's PyTorch path and transformers' MambaForCausalLM (the anchor), same shapes,
same machine, one run, float32, batch 1. Prints a table of seconds and ratios (anchor / HMamba).

    python benchmarks/speed_vs_transformers.py                  # full (minutes on 2 CPU cores)
    python benchmarks/speed_vs_transformers.py --quick          # smaller lengths
    python benchmarks/speed_vs_transformers.py --only decode    # one measurement

The anchor and the HMamba variants are timed interleaved (A, B, C, A, B, C, ...) and each cell is the median
over the repeats, so load from other processes on a shared machine hits all of them alike.

The full `hmamba bench` (memory, plots, JSON, CUDA kernels) is a separate command; this is the quick
side-by-side measurement behind the README's performance figures.
"""

import argparse
import statistics
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

from hmamba import HMambaConfig, HMambaForCausalLM


def interleaved(fns, repeat):
    """Median seconds of each callable, timed round-robin after one warm-up round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def models(vocab, width, layers, chunk_sizes):
    torch.manual_seed(0)
    anchor = MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers))
    ours = {}
    for s in chunk_sizes:
        config = HMambaConfig(vocab_size=vocab, hidden_size=width, num_low_layers=layers // 2,
                              num_high_layers=layers - layers // 2, chunk_size=s)
        ours[s] = HMambaForCausalLM(config)
        if s == 1:  # chunk_size 1 gets the anchor's exact weights, so both compute the same function
            state = {k.replace("backbone.layers.", "backbone.LAYER."): v for k, v in anchor.state_dict().items()}
            for k in list(state):
                if ".LAYER." in k:
                    i, rest = k.split(".LAYER.")[1].split(".", 1)
                    stack, j = ("low_layers", int(i)) if int(i) < layers // 2 else ("high_layers", int(i) - layers // 2)
                    state[f"backbone.{stack}.{j}.{rest}"] = state.pop(k)
            ours[s].load_state_dict(state)
    return anchor, ours


def row(name, times):
    anchor_s = times.pop("anchor")
    cells = "  ".join(f"s={s}: {t:7.3f}s ({anchor_s / t:5.2f}x)" for s, t in times.items())
    print(f"{name:34s} anchor {anchor_s:7.3f}s  {cells}", flush=True)
    return anchor_s, times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter sequences and fewer tokens")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per measurement; the median is shown")
    parser.add_argument("--only", choices=("train", "prefill", "decode"), help="run one measurement only")
    args = parser.parse_args()
    run = lambda what: args.only in (None, what)  # noqa: E731
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = anchor time / HMamba time, "
          f"median of {args.repeat} interleaved rounds")

    if run("train"):
        anchor, ours = models(1024, 256, 8, (1, 4))
        for length in (128, 256) if args.quick else (128, 256, 512):
            ids = torch.randint(0, 1024, (1, length))

            def step(m):
                m.zero_grad()
                m(ids, labels=ids).loss.backward()

            fns = {"anchor": lambda: step(anchor), **{s: (lambda m=m: step(m)) for s, m in ours.items()}}
            row(f"train step 256w/8L T={length}", interleaved(fns, args.repeat))

    if not (run("prefill") or run("decode")):
        return
    anchor, ours = models(50280, 768, 24, (1, 4))
    everyone = {"anchor": anchor, **ours}
    with torch.no_grad():
        if run("prefill"):
            length = 256 if args.quick else 1024
            ids = torch.randint(0, 50280, (1, length))
            fns = {k: (lambda m=m: m(ids, use_cache=False)) for k, m in everyone.items()}
            row(f"prefill 130m shapes T={length}", interleaved(fns, args.repeat))
        if run("decode"):
            new = 16 if args.quick else 64
            prompt = torch.randint(0, 50280, (1, 8))

            def decode(m):
                m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)

            fns = {k: (lambda m=m: decode(m)) for k, m in everyone.items()}
            a, times = row(f"greedy decode 130m, {new} tokens", interleaved(fns, args.repeat))
            print(f"decode tokens/s: anchor {new / a:.1f}, " + ", ".join(f"s={s} {new / t:.1f}" for s, t in times.items()))


if __name__ == "__main__":
    main()
