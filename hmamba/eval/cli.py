"""argparse front ends of `hmamba eval` and `hmamba bench`."""

import argparse

from ..cli import add_device_args, int_at_least, positive_float
from .harness import HUB_TASKS, OFFLINE_TAG


def add_eval(sub):
    p = sub.add_parser(
        "eval",
        help="evaluate with the lm-eval harness and/or the perplexity of a text file",
        description="Run lm-eval tasks on an HMamba checkpoint (offline: the shipped tasks hmamba_lastword, "
        f"hmamba_arc_easy, hmamba_sonnets or the tag {OFFLINE_TAG}; online: e.g. {','.join(HUB_TASKS)}), "
        "and/or the exact and sliding-window perplexity of a text file.",
    )
    p.add_argument("model", help="HMamba checkpoint folder (or Hub id when online)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's)")
    p.add_argument("--tasks", default=None, help=f"comma-separated lm-eval task names (e.g. {OFFLINE_TAG})")
    p.add_argument("--model-type", default="hmamba", choices=["hmamba", "hf"],
                   help="lm-eval model: hmamba (HMambaLM) or hf (stock HFLM, trust_remote_code) (default: hmamba)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1, help="lm-eval batch size (default: 1)")
    add_device_args(p)
    p.add_argument("--limit", type=positive_float, default=None,
                   help="documents per task: a count, or a fraction if < 1 (default: all; for quick checks only)")
    p.add_argument("--num-fewshot", type=int_at_least(0), default=None,
                   help="few-shot examples (default: each task's own)")
    p.add_argument("--text", default=None, help="UTF-8 text file whose perplexity to compute")
    p.add_argument("--max-length", type=int_at_least(1), default=1024,
                   help="sliding-window length in tokens (default: 1024)")
    p.add_argument("--stride", default="512",
                   help="sliding-window stride(s) in tokens, comma-separated for several rows (default: 512)")
    p.add_argument("--output", default=None, help="write the results as JSON here (atomically)")
    p.set_defaults(func=_eval)


def _eval(args):
    from .harness import run

    try:
        strides = tuple(int(s) for s in args.stride.split(","))
    except ValueError:
        raise ValueError(f"--stride {args.stride!r}: expected integers separated by commas, e.g. 256,512") from None
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    run(args.model, tasks=args.tasks, text=args.text, tokenizer=args.tokenizer, model_type=args.model_type,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, limit=limit, num_fewshot=args.num_fewshot,
        max_length=args.max_length, strides=strides, output=args.output)


def _ints(text):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 128,1024") from None


def add_bench(sub):
    from .bench import PRESETS, SECTIONS

    p = sub.add_parser(
        "bench",
        help="speed and memory vs transformers' MambaForCausalLM on the same weights (table, JSON, PNG)",
        description="Prefill tokens/s over lengths, decode latency and tokens/s over batch sizes, peak memory, a "
        "training step over lengths, and this machine's matmul and bandwidth floors; HMamba at several chunk sizes "
        "side by side with transformers' MambaForCausalLM (and mamba_ssm on CUDA), in one run, on the same weights.",
    )
    p.add_argument("--preset", default="130m", choices=sorted(PRESETS),
                   help="model shapes and default lists (default: 130m = 768 wide, 24 layers, vocab 50280)")
    p.add_argument("--quick", action="store_const", const="quick", dest="preset",
                   help="the tiny 'quick' preset (seconds; for checking the command)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, comma-separated (default: all of "
                   f"{','.join(SECTIONS)})")
    p.add_argument("--chunk-sizes", type=_ints, default=None, help="HMamba chunk sizes, e.g. 1,4,16 (default: preset)")
    p.add_argument("--lengths", type=_ints, default=None, help="prefill lengths, e.g. 128,1024 (default: preset)")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="decode batch sizes, e.g. 1,4 (default: preset)")
    p.add_argument("--decode-tokens", type=_ints, default=None,
                   help="generated-token counts (two or more) for decode latency and memory (default: preset)")
    p.add_argument("--train-lengths", type=_ints, default=None, help="training-step lengths (default: preset)")
    p.add_argument("--anchor-train-max", type=int_at_least(0), default=512,
                   help="longest T for the anchor's training step, whose backward is quadratic (default: 512)")
    p.add_argument("--anchor-prefill-max", type=int_at_least(0), default=4096,
                   help="longest T for the anchor's prefill, 4x slower than HMamba's, and for HMamba's "
                        "generate()-style prefill (last-position logits; default: 4096)")
    p.add_argument("--repeat", type=int_at_least(1), default=None,
                   help="timed rounds after a warm-up; each round runs every model once, in turn (default: preset)")
    p.add_argument("--compile-decode", action="store_true",
                   help="also decode with each chunk size's one-token step compiled by torch.compile (model."
                   "compile_decode(); columns 'hmamba s=N compiled'; CPU needs a C++ compiler)")
    add_device_args(p)
    p.add_argument("--out-dir", default="bench-results", help="where bench.json and bench.png go (default: "
                   "bench-results)")
    p.set_defaults(func=_bench)


def _bench(args):
    from .bench import run

    run(out_dir=args.out_dir, preset=args.preset, device=args.device, dtype=args.dtype,
        sections=tuple(s for s in args.only.split(",") if s), chunk_sizes=args.chunk_sizes, lengths=args.lengths,
        batch_sizes=args.batch_sizes, decode_tokens=args.decode_tokens, train_lengths=args.train_lengths,
        anchor_train_max=args.anchor_train_max, anchor_prefill_max=args.anchor_prefill_max, repeat=args.repeat,
        compile_decode=args.compile_decode)
