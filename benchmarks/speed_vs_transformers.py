"""Side-by-side speed of HMamba's PyTorch path and transformers' MambaForCausalLM (the anchor), same shapes,
same machine, one run, float32, batch 1. Prints a table of seconds and ratios (anchor / HMamba).

    python benchmarks/speed_vs_transformers.py            # full (minutes on 2 CPU cores)
    python benchmarks/speed_vs_transformers.py --quick    # smaller lengths

The full `hmamba bench` (memory, plots, JSON, CUDA kernels) is a later issue; this is the measurement behind the
README's performance figures until then.
"""

import argparse
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

from hmamba import HMambaConfig, HMambaForCausalLM


def seconds(fn, repeat):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


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


def row(name, anchor_s, ours):
    cells = "  ".join(f"s={s}: {t:7.3f}s ({anchor_s / t:5.1f}x)" for s, t in ours.items())
    print(f"{name:34s} anchor {anchor_s:7.3f}s  {cells}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter sequences and fewer tokens")
    parser.add_argument("--repeat", type=int, default=2, help="timed repetitions per cell (default: 2)")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = anchor time / HMamba time")

    anchor, ours = models(1024, 256, 8, (1, 4))
    for length in (128, 256) if args.quick else (128, 256, 512):
        ids = torch.randint(0, 1024, (1, length))

        def step(m):
            m.zero_grad()
            m(ids, labels=ids).loss.backward()

        row(f"train step 256w/8L T={length}", seconds(lambda: step(anchor), args.repeat),
            {s: seconds(lambda m=m: step(m), args.repeat) for s, m in ours.items()})

    anchor, ours = models(50280, 768, 24, (1, 4))
    length = 256 if args.quick else 1024
    ids = torch.randint(0, 50280, (1, length))
    with torch.no_grad():
        row(f"prefill 130m shapes T={length}", seconds(lambda: anchor(ids, use_cache=False), 1),
            {s: seconds(lambda m=m: m(ids, use_cache=False), 1) for s, m in ours.items()})
        new = 16 if args.quick else 64
        prompt = ids[:, :8]

        def decode(m):
            m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)

        a = seconds(lambda: decode(anchor), 1)
        times = {s: seconds(lambda m=m: decode(m), 1) for s, m in ours.items()}
        row(f"greedy decode 130m, {new} tokens", a, times)
        print(f"decode tokens/s: anchor {new / a:.1f}, " + ", ".join(f"s={s} {new / t:.1f}" for s, t in times.items()))


if __name__ == "__main__":
    main()
