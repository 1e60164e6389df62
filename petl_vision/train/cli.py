"""The command line shared by the training scripts: --config, key=value overrides, --resume, flags.

`training_parser` serves the classifier-style scripts (train_classifier, train_clip,
train_pointcloud); `diffusion_parser` the diffusers ones (finetune_diffusion, erase_concept). Each
script adds its own options and `parse_training_args` turns the flags into `key=value` overrides.
"""
from __future__ import annotations

import argparse

from .config import format_override

RESUME_HELP = "resume from DIR (a checkpoint or output dir); alone: the latest checkpoint of output_dir"


def training_parser(description: str, config_help: str, config_required: bool = True, mixed_precision: bool = True,
                    merge: bool = True, resume_help: str = RESUME_HELP) -> argparse.ArgumentParser:
    """An argparse parser with the options every training script takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=config_required, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR", help=resume_help)
    if mixed_precision:
        parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="overrides mixed_precision")
    if merge:
        parser.add_argument("--merge", action="store_true", help="also save <output_dir>/merged.safetensors when mergeable")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def diffusion_parser(description: str, config_help: str) -> argparse.ArgumentParser:
    """training_parser for the diffusion scripts: optional --config, no --merge, plus --model and --max-steps."""
    parser = training_parser(description, config_help, config_required=False, merge=False,
                             resume_help="resume from DIR (a checkpoint); alone: the latest checkpoint under output_dir")
    parser.add_argument("--model", help="diffusers pipeline folder or hub id")
    parser.add_argument("--max-steps", type=int, help="overrides max_steps")
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv=None, output_dir: bool = True, config_flags: tuple[str, ...] = (),
                        flags_win: bool = True) -> tuple[argparse.Namespace, list[str]]:
    """(args, overrides): the user's `key=value` overrides and the flags turned into overrides.

    Options and overrides may be interleaved; `--resume key=value` is `--resume` and an override.
    output_dir: also turn --output-dir into an override (the demo places its runs itself).
    config_flags: a script's own options named like config keys (`max_steps` for --max-steps); each
        one given becomes `key=value`.
    flags_win: the flags' overrides come after the user's (so they win); False puts them first.
    """
    args = parser.parse_intermixed_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: an override, not a DIR
        args.overrides.insert(0, args.resume)
        args.resume = True
    flags = {key: getattr(args, key) for key in config_flags}
    flags["mixed_precision"] = getattr(args, "mixed_precision", None)
    flags["merge"] = True if getattr(args, "merge", False) else None
    flags["progress"] = False if args.no_progress else None
    flags["output_dir"] = args.output_dir if output_dir else None
    from_flags = [format_override(key, value) for key, value in flags.items() if value is not None]
    overrides = list(args.overrides) + from_flags if flags_win else from_flags + list(args.overrides)
    return args, overrides
