"""argparse front ends of `hmamba convert` and `hmamba export`."""


def add_convert(sub):
    p = sub.add_parser(
        "convert",
        help="convert a pretrained Mamba checkpoint (mamba_ssm or transformers -hf layout) to HMamba",
        description="Split a pretrained Mamba's layers into HMamba's L-stack, H-stack and out layers. "
        "--chunk-size 1 reproduces the source exactly; larger chunk sizes need fine-tuning.",
    )
    p.add_argument("src", help="source checkpoint: a local folder or a Hugging Face Hub id (needs network)")
    p.add_argument("out", help="output folder (written atomically; must be empty unless --overwrite)")
    p.add_argument("--low-layers", type=int, default=None, help="layers in the L-stack (default: half the layers)")
    p.add_argument("--out-layers", type=int, default=0, help="token-rate layers after the fusion (default: 0)")
    p.add_argument("--chunk-size", type=int, default=1, help="tokens per H-stack position (default: 1, exact)")
    p.add_argument("--pooling", default="last", choices=["last", "mean"], help="chunk summary (default: last)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=_convert)


def _convert(args):
    from .checkpoints import convert, format_summary

    summary = convert(args.src, args.out, low_layers=args.low_layers, out_layers=args.out_layers,
                      chunk_size=args.chunk_size, pooling=args.pooling, dtype=args.dtype, overwrite=args.overwrite)
    print(format_summary(summary))


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
