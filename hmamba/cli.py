"""`hmamba` command line: thin argparse wrappers over library functions."""

import argparse
import signal
import sys
import threading


def device_arg(text):
    """argparse type of --device: a torch device this machine has."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({e}); e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch sees no CUDA device; use cpu")
    return text


def int_at_least(low):
    """argparse type: an integer >= low (argparse shows its message, not a traceback later in the run)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text):
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def add_device_args(p):
    """--device and --dtype, as every command that runs a model takes them."""
    p.add_argument("--device", type=device_arg, default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32)")


def _add_generate(sub):
    p = sub.add_parser(
        "generate",
        help="generate text with an HMamba model (default: the shipped KJV-trained model)",
        description="Generate text. Without --model, saves the HMamba shipped in the package (hmamba/pretrained/"
        "kjv-small, trained on the King James Bible, byte-level tokenizer), loads it back through "
        "AutoModelForCausalLM, generates, and prints its held-out perplexity next to an untrained model's.",
    )
    p.add_argument("--model", default=None, help="saved model folder or Hub id (default: the shipped KJV model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's)")
    p.add_argument("--save-dir", default=None,
                   help="where to save the shipped model (default: a temporary folder, removed at the end)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for a left-padded batch (default: 'In the beginning')")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64,
                   help="tokens to generate per prompt (default: 64)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-k", type=int_at_least(0), default=50,
                   help="top-k sampling cut-off, 0 for none (with --do-sample; default: 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (for checking)")
    add_device_args(p)
    p.set_defaults(func=_generate)


def _generate(args):
    from .generate import run

    run(
        model_path=args.model,
        tokenizer=args.tokenizer,
        prompts=args.prompt or ["In the beginning"],
        save_dir=args.save_dir,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        use_cache=not args.no_cache,
        device=args.device,
        dtype=args.dtype,
    )


def build_parser():
    from . import __version__

    parser = argparse.ArgumentParser(prog="hmamba", description="Hierarchical Mamba language models for transformers.")
    parser.add_argument("--version", action="version", version=f"hmamba {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    from .conversion.cli import add_convert, add_export

    add_convert(sub)
    add_export(sub)
    from .train_cli import add_train

    add_train(sub)
    from .eval.cli import add_bench, add_eval

    add_eval(sub)
    add_bench(sub)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line, recorded in what it makes (train_results.json, model cards)
    # only the main thread may set handlers; a handler the caller installed (or SIG_IGN) is left alone
    default = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    handle = default and threading.current_thread() is threading.main_thread()
    if handle:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # bad input, missing or unreadable files, an unreachable Hub
        print(f"hmamba {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs being written were removed on the way out (atomic writers)
        print(f"\nhmamba {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0


def _terminate(signum, frame):
    """SIGTERM (kill, timeout, a job scheduler) unwinds like Ctrl-C, so half-written outputs are removed; exit 143.
    Further SIGTERMs are ignored while the cleanup runs."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
