"""argparse front ends of `hmamba convert` and `hmamba export`."""

import os


def add_convert(sub):
    p = sub.add_parser(
        "convert",
        help="convert a pretrained Mamba checkpoint (mamba_ssm or transformers -hf layout) to HMamba",
        description="Split a pretrained Mamba's layers into HMamba's L-stack, H-stack and out layers. "
        "--chunk-size 1 reproduces the source exactly; larger chunk sizes need fine-tuning.",
    )
    p.add_argument("src", help="source checkpoint: a local folder or a Hugging Face Hub id (needs network)")
    p.add_argument("out", help="output folder (written atomically; must be empty unless --overwrite)")
    p.add_argument("--low-layers", type=int, default=None,
                   help="layers in the L-stack (default: half of those not in --out-layers)")
    p.add_argument("--out-layers", type=int, default=0, help="token-rate layers after the fusion (default: 0)")
    p.add_argument("--chunk-size", type=int, default=1, help="tokens per H-stack position (default: 1, exact)")
    p.add_argument("--pooling", default="last", choices=["last", "mean"], help="chunk summary (default: last)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or Hub id to save into OUT (mamba_ssm checkpoints ship none; state-spaces/"
                   "mamba-* use EleutherAI/gpt-neox-20b); default: the tokenizer files found in SRC")
    p.add_argument("--base-model", default=None,
                   help="Hub id of the source, for the model card's base_model (default: SRC when it is a Hub id)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="after converting, upload OUT to the Hub model repo REPO (owner/name; needs `hf auth login` "
                   "or HF_TOKEN); OUT must then hold tokenizer files")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create REPO as a private repo")
    p.set_defaults(func=_convert)


def _convert(args):
    from ..hub import TOKENIZER_FILES, UploadError, check_repo_id, push_folder_to_hub
    from .checkpoints import convert, format_summary

    if args.push_to_hub:  # checked before the conversion's work (a Hub SRC's files only after its download)
        check_repo_id(args.push_to_hub)
        if args.tokenizer is None and os.path.isdir(args.src) and not set(TOKENIZER_FILES) & set(os.listdir(args.src)):
            raise ValueError(f"{args.src} has no tokenizer ({' or '.join(TOKENIZER_FILES)}) to upload with the model: "
                             "pass --tokenizer (state-spaces/mamba-* use EleutherAI/gpt-neox-20b)")
    summary = convert(args.src, args.out, low_layers=args.low_layers, out_layers=args.out_layers,
                      chunk_size=args.chunk_size, pooling=args.pooling, dtype=args.dtype, overwrite=args.overwrite,
                      tokenizer=args.tokenizer, base_model=args.base_model, repo_id=args.push_to_hub)
    print(format_summary(summary))
    if args.push_to_hub:
        try:
            commit = push_folder_to_hub(args.out, args.push_to_hub, private=args.private)
        except UploadError as e:
            hint = f"{args.out} is complete: retry with `hf upload {args.push_to_hub} {args.out}`"
            raise UploadError(f"{e}; {hint}") from e
        print(f"uploaded {args.out} to https://huggingface.co/{args.push_to_hub}: {commit.commit_url}")


def add_export(sub):
    p = sub.add_parser(
        "export",
        help="export an HMamba checkpoint with chunk_size=1 as a flat Mamba (-hf or mamba_ssm layout)",
        description="Write an HMamba (chunk_size=1) checkpoint back as a flat Mamba.",
    )
    p.add_argument("src", help="HMamba checkpoint folder")
    p.add_argument("out", help="output folder (written atomically; must be empty unless --overwrite)")
    p.add_argument("--layout", default="hf", choices=["hf", "mamba_ssm"],
                   help="hf: transformers MambaForCausalLM (safetensors); mamba_ssm: state-spaces layout (.bin)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=_export)


def _export(args):
    from .checkpoints import export, format_summary

    print(format_summary(export(args.src, args.out, layout=args.layout, overwrite=args.overwrite)))
