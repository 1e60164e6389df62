"""The command line shared by the scripts: --config, key=value overrides, --resume, flags, errors.

`training_parser` serves the classifier-style scripts (train_classifier, train_clip,
train_pointcloud); `diffusion_parser` the diffusers ones (finetune_diffusion, erase_concept). Each
script adds its own options and `parse_training_args` turns the flags into `key=value` overrides.

`run_cli(main)` runs every script's main: a user mistake (USER_ERRORS: a bad config value, a
missing file, a method that does not fit the model, ...) prints one `error: <message>` line to
stderr and exits with status 2; `--debug` or PETL_VISION_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import inspect
import os
import pickle
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from petl_vision.data.common import worker_message

from .config import ConfigError, format_override

DEBUG_ENV = "PETL_VISION_DEBUG"
USER_ERROR_STATUS = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean a user mistake (or a broken input), not a bug of petl_vision."""
    from PIL import Image
    from safetensors import SafetensorError

    from petl_vision.core import errors

    own = tuple(v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception))
    return own + (
        ValueError,  # ConfigError, DataError, UnicodeDecodeError, json errors, HF repo-id errors, ...
        KeyError,  # a key missing from a user's file
        OSError,  # FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, disk full
        FloatingPointError,  # a non-finite loss
        ImportError,  # an optional dependency the config asks for (bitsandbytes, a tracker)
        yaml.YAMLError,
        pickle.UnpicklingError,  # a .pt/.pth checkpoint that is not one
        Image.DecompressionBombError,
        SafetensorError,
    )


USER_ERRORS = _user_errors()


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose usage errors are one line too: `error: <message> (see <prog> --help)`, status 2."""

    def error(self, message: str):
        self.exit(USER_ERROR_STATUS, f"error: {message} (see {self.prog} --help)\n")


def add_debug_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--debug`: run_cli shows the full traceback of an error instead of one line."""
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error instead of one line (or set {DEBUG_ENV}=1)")
    return parser


def debug_requested(argv: Sequence[str]) -> bool:
    """True for `--debug` among the arguments or PETL_VISION_DEBUG set to anything but "", "0", "false", "no"."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_message(err: BaseException) -> str:
    """`err` as one line: its message (an OSError as "<reason>: <file>"; a DataLoader worker's traceback cut
    down to the original message), lines joined with "; ", the type named when it is a library's own."""
    if isinstance(err, KeyError) and len(err.args) == 1:
        key = err.args[0]
        described = isinstance(key, str) and " " in key.strip()
        text = key if described else f"key {key!r} not found (run with --debug for the traceback)"
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err)
    text = worker_message(text)  # torch re-raises a worker's exception with the worker's traceback as its message
    module = type(err).__module__
    if not text.strip():
        text = type(err).__name__
    elif module != "builtins" and not module.startswith("petl_vision"):
        text = f"{type(err).__name__}: {text}"  # e.g. SafetensorError, DecompressionBombError
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` (default: sys.argv[1:]); the exit status: main's own when it returns an int (else 0),
    or 2 after one `error:` line on stderr.

    A USER_ERRORS exception is printed as `error: <message>` (error_message), unless `--debug` is among
    the arguments or PETL_VISION_DEBUG=1: then it propagates with its traceback. Other exceptions
    (bugs) always propagate.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = main(argv)
    except USER_ERRORS as err:
        if debug_requested(argv):
            raise
        print(f"error: {error_message(err)}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    leave_process_group()
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def leave_process_group() -> None:
    """After a multi-process run (torchrun, accelerate launch): every process waits for the others, then
    destroys the process group, instead of leaving it to interpreter teardown (where a rank tearing gloo
    down while another still used it aborted now and then)."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def report(text: str) -> None:
    """Print `text` once: from the main process of a multi-process launch (RANK 0), else always."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def trainer_options(trainer: Callable, args: argparse.Namespace) -> dict:
    """The keyword options of the command line `trainer` accepts: resume, and overwrite where it has it."""
    options = {"resume": args.resume}
    if getattr(args, "overwrite", False) and "overwrite" in inspect.signature(trainer).parameters:
        options["overwrite"] = True
    return options

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # namespace/name, as the Hub spells repo ids


def check_pipeline_arg(model: str, flag: str = "--model") -> None:
    """ConfigError naming `flag` unless `model` is a diffusers pipeline folder (with model_index.json) or
    has the form of a Hub repo id (`namespace/name`), checked before anything heavy is loaded."""
    path = Path(model).expanduser()
    accepted = "a diffusers pipeline folder (with model_index.json) or a Hub repo id such as runwayml/stable-diffusion-v1-5"
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"{flag} {model}: no model_index.json in this folder; expected {accepted}")
    elif path.exists():
        raise ConfigError(f"{flag} {model}: is a file; expected {accepted}")
    elif not _HUB_ID.fullmatch(model):
        raise ConfigError(f"{flag} {model}: no such folder; expected {accepted}")


RESUME_HELP = "resume from DIR (a checkpoint or output dir); alone: the latest checkpoint of output_dir"


def training_parser(description: str, config_help: str, config_required: bool = True, mixed_precision: bool = True,
                    merge: bool = True, resume_help: str = RESUME_HELP,
                    override_example: str = "optim.lr=0.01") -> argparse.ArgumentParser:
    """An argparse parser with the options every training script takes (override_example: a valid key=value)."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=config_required, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {override_example}")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR", help=resume_help)
    if mixed_precision:
        parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="overrides mixed_precision")
    if merge:
        parser.add_argument("--merge", action="store_true", help="also save <output_dir>/merged.safetensors when mergeable")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="train into an output_dir that holds another run")
    return add_debug_argument(parser)


def diffusion_parser(description: str, config_help: str) -> argparse.ArgumentParser:
    """training_parser for the diffusion scripts: optional --config, no --merge, plus --model and --max-steps."""
    parser = training_parser(description, config_help, config_required=False, merge=False, override_example="lr=1e-4",
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
