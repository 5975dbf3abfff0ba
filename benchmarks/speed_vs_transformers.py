"""Thin wrapper over `hmamba bench` (hmamba/eval/bench.py), kept so the README's earlier command still runs: the
rows of the speed table (training step 256 wide / 8 layers at T=128..512, prefill of 1024 tokens and greedy
decode at mamba-130m shapes; HMamba chunk sizes 1 and 4 against transformers' MambaForCausalLM).

    python benchmarks/speed_vs_transformers.py            # = hmamba bench --preset 130m --chunk-sizes 1,4 ...
    python benchmarks/speed_vs_transformers.py --quick    # shorter sequences
"""

import argparse

from hmamba.eval.bench import run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter sequences and fewer tokens")
    parser.add_argument("--out-dir", default="bench-results", help="where bench.json / bench.png go")
    args = parser.parse_args()
    run(out_dir=args.out_dir, preset="130m", chunk_sizes=(1, 4), lengths=(256,) if args.quick else (1024,),
        batch_sizes=(1,), decode_tokens=(4, 16) if args.quick else (16, 64),
        train_lengths=(128, 256) if args.quick else (128, 256, 512), repeat=1 if args.quick else 2)


if __name__ == "__main__":
    main()
