"""The command line shared by the training scripts: --config, key=value overrides, --resume, flags."""
from __future__ import annotations

import argparse


def training_parser(description: str, config_help: str, config_required: bool = True,
                    mixed_precision: bool = True, merge: bool = True) -> argparse.ArgumentParser:
    """An argparse parser with the options every training script takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=config_required, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                        help="resume from DIR (a checkpoint or output dir); alone: the latest checkpoint of output_dir")
    if mixed_precision:
        parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="overrides mixed_precision")
    if merge:
        parser.add_argument("--merge", action="store_true", help="also save <output_dir>/merged.safetensors when mergeable")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv=None, output_dir: bool = True) -> tuple[argparse.Namespace, list[str]]:
    """(args, overrides): the flags turned into `key=value` overrides after the user's own.

    output_dir: also turn --output-dir into an override (the demo places its runs itself).
    """
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: an override, not a DIR
        args.overrides.insert(0, args.resume)
        args.resume = True
    overrides = list(args.overrides)
    if getattr(args, "mixed_precision", None):
        overrides.append(f"mixed_precision={args.mixed_precision}")
    if getattr(args, "merge", False):
        overrides.append("merge=true")
    if args.no_progress:
        overrides.append("progress=false")
    if output_dir and args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return args, overrides
