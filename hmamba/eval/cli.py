"""argparse front ends of `hmamba eval` and `hmamba bench`."""

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
    p.add_argument("--tasks", default=None, help=f"comma-separated lm-eval task names (e.g. {OFFLINE_TAG})")
    p.add_argument("--model-type", default="hmamba", choices=["hmamba", "hf"],
                   help="lm-eval model: hmamba (HMambaLM) or hf (stock HFLM, trust_remote_code) (default: hmamba)")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default: 1)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task: a count, or a fraction if < 1 (default: all; for quick checks only)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--text", default=None, help="UTF-8 text file whose perplexity to compute")
    p.add_argument("--max-length", type=int, default=1024, help="sliding-window length in tokens (default: 1024)")
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
    run(args.model, tasks=args.tasks, text=args.text, model_type=args.model_type, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, limit=limit, num_fewshot=args.num_fewshot,
        max_length=args.max_length, strides=strides, output=args.output)
