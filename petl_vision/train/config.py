"""Training configuration: dataclasses, YAML loading with `base:` inheritance, CLI overrides.

A YAML file maps one to one onto `TrainConfig`: top-level keys are its fields, and the sections
`data`, `method`, `optim` and `sched` map onto the section dataclasses. `method` holds `name`
plus any fields of that method's config (passed to `pv.apply` as overrides), e.g.
`method: {name: vpt, num_prompts: 50, deep: true}`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


# PyYAML follows YAML 1.1, where `1e-3` and `1.0e3` are strings; configs and overrides read them as
# floats (YAML 1.2), and format_override quotes such strings so that they stay strings.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads `1e-3`, `1.0e3` and `5E+2` as floats."""


class YamlDumper(yaml.SafeDumper):
    """yaml.SafeDumper that quotes the strings YamlLoader would read as floats."""


for _cls in (YamlLoader, YamlDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def load_yaml(text: str):
    """`text` parsed with YamlLoader (safe; `1e-3` is a float)."""
    return yaml.load(text, Loader=YamlLoader)


@dataclass
class DataConfig:
    kind: str = "digits"  # "imagefolder" | "vtab" | "digits"
    root: str | None = None  # imagefolder: holds train/ and val/; vtab: holds <task>/
    train_root: str | None = None  # imagefolder only, instead of root
    eval_root: str | None = None  # imagefolder only, instead of root
    task: str | None = None  # vtab task folder name, e.g. "cifar"
    train_split: str | None = None  # vtab: train800val200; imagefolder: train
    eval_split: str | None = None  # vtab: test; imagefolder: val
    augment: bool = False  # timm training augmentation; default is a plain resize (SSF VTAB recipe)
    input_size: int | None = None  # None: from the model's timm data config
    test_fraction: float = 0.3  # digits only
    seed: int = 0  # digits split seed


@dataclass
class MethodSection:
    name: str = "ssf"  # any of pv.list_methods()
    overrides: dict[str, Any] = field(default_factory=dict)  # method config fields for pv.apply


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw" | "sgd"
    lr: float = 5e-3
    weight_decay: float = 5e-5  # not applied to 1-d parameters (biases, norms, SSF scales/shifts)
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    lr_scaling: str = "none"  # "none" | "linear256": lr * effective_batch / 256 (VPT)


@dataclass
class SchedConfig:
    name: str = "cosine"  # "cosine" | "constant"; stepped per optimizer step
    warmup_epochs: float = 10.0  # linear warm-up from ~0 to lr
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    model: str = "demo_vit"  # timm model name, or "demo_vit"
    pretrained: bool = True
    checkpoint: str | None = None  # local weights file for the backbone (no network)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    num_classes: int | None = None  # None: from the data
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodSection = field(default_factory=MethodSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    epochs: int = 100
    batch_size: int = 32  # per process
    eval_batch_size: int | None = None  # None: 2 * batch_size
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    mixed_precision: str | None = None  # "no" | "fp16" | "bf16"; None: accelerate's (launcher) setting
    seed: int = 0
    output_dir: str = "runs/default"
    num_workers: int = 0
    keep_checkpoints: int = 2  # keep the last k epoch checkpoints
    merge: bool = False  # also write merged.safetensors when the methods can be merged
    progress: bool = True  # tqdm bar (shown only on a TTY)
    feature_cache: bool = True  # side networks (lst, unipt) without augmentation: cache backbone features on disk
    overwrite: bool = False  # replace the run output_dir holds (--overwrite); else such an output_dir is refused
    log_with: str | None = None  # Accelerate trackers, comma-separated (tensorboard, wandb, ...); None: metrics.jsonl only


SECTIONS = {"data": DataConfig, "method": MethodSection, "optim": OptimConfig, "sched": SchedConfig}


def valid_keys() -> list[str]:
    """Every accepted dotted key, e.g. `optim.lr`; `method.<field>` stands for method fields."""
    keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS]
    for name, cls in SECTIONS.items():
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "overrides"]
        keys += [f"{name}.{f}" for f in fields]
    return keys + ["method.<any field of the method's config>"]


# ----------------------------------------------------------------------------- raw dict stage


def read_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML file (load_yaml); ConfigError naming the file for a missing, binary or malformed file."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {path} (expected a YAML file, e.g. configs/demo_digits.yaml)")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); expected a YAML config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(raw).__name__}")
    return raw


def read_yaml(path: str | Path, train_keys: bool = True, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file into a nested dict, resolving `base:` (relative to the file; child wins).

    train_keys: check every key against TrainConfig and expand `method: ssf`; off for trainers whose
    configs have sections of their own (they check the merged dict themselves).
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"circular `base:` chain: {' -> '.join(map(str, _seen + (path,)))}")
    raw = read_mapping(path)
    if train_keys:
        check_keys(raw, str(path))
        if isinstance(raw.get("method"), str):  # `method: ssf` is short for `method: {name: ssf}`
            raw["method"] = {"name": raw["method"]}
    base = raw.pop("base", None)
    if base is None:
        return raw
    bases = [base] if isinstance(base, str) else list(base)
    merged: dict = {}
    for b in bases:
        merged = merge_dicts(merged, read_yaml(path.parent / b, train_keys, _seen + (path,)))
    return merge_dicts(merged, raw)


def merge_dicts(base: dict, child: dict) -> dict:
    """Recursive dict merge, child wins. A child `method` naming another method replaces the base's."""
    out = dict(base)
    for key, value in child.items():
        if key == "method" and isinstance(value, dict) and isinstance(out.get(key), dict):
            if "name" in value and value["name"] != out[key].get("name"):
                out[key] = dict(value)
                continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def check_keys(raw: dict, source: str) -> None:
    """ConfigError naming the key and `source` for any key TrainConfig does not have."""
    top = {f.name for f in dataclasses.fields(TrainConfig)} | {"base"}
    for key, value in raw.items():
        if key not in top:
            raise ConfigError(f"{source}: unknown key {key!r}; valid keys: {', '.join(valid_keys())}")
        if key in SECTIONS and key != "method":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key!r} must be a mapping, got {value!r}")
            names = {f.name for f in dataclasses.fields(SECTIONS[key])}
            for sub in value:
                if sub not in names:
                    raise ConfigError(
                        f"{source}: unknown key '{key}.{sub}'; valid keys: {', '.join(k for k in valid_keys() if k.startswith(key + '.'))}"
                    )
        if key == "method" and not isinstance(value, (dict, str)):
            raise ConfigError(f"{source}: 'method' must be a mapping (name: ..., fields...) or a name, got {value!r}")


OVERRIDE_FORM = "key=value with a dotted key and a YAML value, e.g. optim.lr=0.01, method.name=vpt or surrogate='a dog'"


def parse_override(item: str, empty: Any = None) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3): the dotted key and the value read with load_yaml
    (YAML; `1e-3` is a float).

    `key=` (nothing after `=`) gives `empty`. ConfigError naming `item` and the accepted form for a
    missing `=`, an empty key part or a value YAML cannot read.
    """
    key, sep, text = item.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"override {item!r}: expected {OVERRIDE_FORM}")
    if not text.strip():
        return path, empty
    try:
        return path, load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                          f"expected {OVERRIDE_FORM}") from None


def format_override(key: str, value: Any) -> str:
    """The `key=value` text that parse_override reads back as `value` (strings quoted only when YAML needs it)."""
    text = yaml.dump(value, Dumper=YamlDumper, default_flow_style=True, width=float("inf"), allow_unicode=True)
    text = text.removesuffix("...\n").strip()  # a plain scalar ends its YAML document with "..."
    return f"{key}={text}"


def nested(path: list[str], value: Any) -> dict:
    """A parsed override as a dict to merge into a raw config: (["a", "b"], 3) -> {"a": {"b": 3}}.

    `method=vpt` is short for `method.name=vpt`.
    """
    if path == ["method"] and isinstance(value, str):
        value = {"name": value}
    for part in reversed(path[1:]):
        value = {part: value}
    return {path[0]: value}


def check_override(item: str, path: list[str], keys, sections=()) -> None:
    """ConfigError naming `item` unless `path[0]` is one of `keys`; only `sections` take dotted sub-keys."""
    if path[0] not in keys:
        raise ConfigError(f"override {item!r}: unknown key {path[0]!r}; valid keys: {', '.join(keys)}")
    if len(path) > 1 and path[0] not in sections:
        accepted = f"only {', '.join(s + '.<field>' for s in sections)} take" if sections else "no key takes"
        raise ConfigError(f"override {item!r}: {path[0]!r} has no sub-keys ({accepted} a dotted key)")


def apply_override(raw: dict, item: str) -> dict:
    """`raw` with one TrainConfig override `dotted.key=value` merged in (see parse_override).

    ConfigError naming the override for an unknown key or a value of the wrong type.
    """
    path, value = parse_override(item)
    patch = nested(path, value)
    source = f"override {item!r}"
    check_keys(patch, source)
    if path[0] in SECTIONS and len(path) > 2:
        raise ConfigError(f"{source}: '{'.'.join(path[:2])}' is not a section; valid keys: {', '.join(valid_keys())}")
    tp = _override_type(path)
    if tp is not None:
        coerce(value, tp, source, ".".join(path))
    if path in (["method"], ["method", "name"]) and isinstance(value, str):
        check_method_name(value, source)
    return merge_dicts(raw, patch)


def check_method_name(name: str, source: str) -> None:
    """ConfigError naming `source` when `name` is not a registered method (skipped without the core)."""
    try:
        from petl_vision import list_methods
    except ImportError:
        return
    if name not in list_methods():
        raise ConfigError(f"{source}: unknown method {name!r}; registered methods: {', '.join(list_methods())}")


def _override_type(path: list[str]):
    """The type TrainConfig expects at `path`; None for a whole section, a method field or inside a dict field."""
    if path[0] == "method":
        return str if path[1:] == ["name"] else None
    if path[0] in SECTIONS:
        return _hints(SECTIONS[path[0]])[path[1]] if len(path) == 2 else None
    return _hints(TrainConfig)[path[0]] if len(path) == 1 else None


# ----------------------------------------------------------------------------- typed stage


def from_dict(raw: dict, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a nested dict (checked and type-coerced)."""
    raw = dict(raw)
    raw.pop("base", None)
    check_keys(raw, source)
    kwargs = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in raw:
            continue
        value = raw[f.name]
        if f.name == "method":
            method = {"name": value} if isinstance(value, str) else dict(value)
            name = method.pop("name", MethodSection.name)
            kwargs["method"] = MethodSection(name=coerce(name, str, source, "method.name"), overrides=method)
        elif f.name in SECTIONS:
            kwargs[f.name] = build_section(SECTIONS[f.name], value, source, f.name + ".")
        else:
            kwargs[f.name] = coerce(value, _hints(TrainConfig)[f.name], source, f.name)
    cfg = TrainConfig(**kwargs)
    validate(cfg, source)
    return cfg


CHOICES = {
    "data.kind": ("imagefolder", "vtab", "digits"),
    "optim.name": ("adamw", "sgd"),
    "optim.lr_scaling": ("none", "linear256"),
    "sched.name": ("cosine", "constant"),
    "mixed_precision": (None, "no", "fp16", "bf16"),
}


def validate(cfg: TrainConfig, source: str = "config") -> None:
    """ConfigError for out-of-range values and, when the core is importable, bad method fields."""
    values = {
        "data.kind": cfg.data.kind,
        "optim.name": cfg.optim.name,
        "optim.lr_scaling": cfg.optim.lr_scaling,
        "sched.name": cfg.sched.name,
        "mixed_precision": cfg.mixed_precision,
    }
    for key, value in values.items():
        if value not in CHOICES[key]:
            accepted = ", ".join(str(c) for c in CHOICES[key] if c is not None)
            raise ConfigError(f"{source}: {key} must be one of {accepted}, got {value!r}")
    for key in ("epochs", "batch_size", "grad_accum_steps", "keep_checkpoints"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{source}: {key} must be >= 1, got {getattr(cfg, key)}")
    if not isinstance(cfg.optim.betas, list) or len(cfg.optim.betas) != 2:
        raise ConfigError(f"{source}: optim.betas must be a list of two numbers in [0, 1), e.g. [0.9, 0.999], got {cfg.optim.betas!r}")
    try:
        from petl_vision import make_config
    except ImportError:  # the core is not there yet: pv.apply will check the method fields
        return
    try:
        make_config(cfg.method.name, **cfg.method.overrides)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{source}: method {cfg.method.name!r}: {e}") from e


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when `path` is None) plus `key=value` overrides."""
    raw = read_yaml(path) if path is not None else {}
    for item in overrides:
        raw = apply_override(raw, item)
    return from_dict(raw, str(path) if path is not None else "config")


def to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict (YAML-able) of a TrainConfig; method overrides are flattened into `method`."""
    out = dataclasses.asdict(cfg)
    out["method"] = {"name": cfg.method.name, **cfg.method.overrides}
    return out


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def build_section(cls, values: dict, source: str, prefix: str = ""):
    """`cls(**values)` for a config dataclass, each value coerced to its field's type.

    ConfigError naming `source` and the dotted key (`prefix` + field, e.g. "data.shots") for an
    unknown field or a value of the wrong type.
    """
    return cls(**_section_values(cls, values, source, prefix))


def _section_values(cls, values: dict, source: str, prefix: str) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')!r} must be a mapping, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {[prefix + k for k in unknown]}; valid: {sorted(prefix + n for n in names)}")
    hints = _hints(cls)
    return {k: coerce(v, hints[k], source, prefix + k) for k, v in values.items()}


def apply_section_override(raw: dict, item: str, sections: dict[str, type]) -> dict:
    """`raw` with one override merged in, for trainers whose configs add sections of their own.

    sections: section name -> config dataclass (e.g. {"data": PointDataConfig}). `<section>.<field>=value`
    is checked and coerced against that dataclass; any other key is a TrainConfig override
    (`apply_override`). ConfigError naming the override for an unknown key or a wrong type.
    """
    path, value = parse_override(item)
    if path[0] not in sections or len(path) == 1:
        return apply_override(raw, item)
    source = f"override {item!r}"
    if len(path) > 2:
        raise ConfigError(f"{source}: '{'.'.join(path[:2])}' is not a section; '{path[0]}' takes {path[0]}.<field>")
    _section_values(sections[path[0]], {path[1]: value}, source, path[0] + ".")
    return merge_dicts(raw, nested(path, value))


def _interval(lo, hi, lo_open=False, hi_open=False):
    """A (check, text) pair: finite numbers in the interval; None bounds are unbounded."""
    def check(v):
        return (math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))
    if hi is None:
        text = f"a finite number {'>' if lo_open else '>='} {lo}"
    else:
        text = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return check, text


POSITIVE, NON_NEGATIVE, FRACTION = _interval(0, None, lo_open=True), _interval(0, None), _interval(0, 1)
BETA = _interval(0, 1, hi_open=True)
# The range of every numeric field by its name, the last part of its dotted key (`optim.lr` and the
# diffusion trainers' `lr` alike), in any trainer's config: classifier, CLIP, point cloud, diffusion, erasure.
RANGES = {
    "lr": POSITIVE, "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "momentum": BETA,
    "betas": BETA, "adam_betas": BETA, "adam_eps": POSITIVE, "label_smoothing": FRACTION,
    "clip_grad_norm": POSITIVE, "max_grad_norm": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE, "num_workers": NON_NEGATIVE, "eval_batch_size": _interval(1, None),
    "num_classes": _interval(1, None), "input_size": _interval(1, None), "shots": NON_NEGATIVE,
    "test_fraction": _interval(0, 1, lo_open=True, hi_open=True), "crop_scale": _interval(0, 1, lo_open=True),
    "noise": NON_NEGATIVE, "num_points": _interval(1, None), "samples_per_class": _interval(1, None),
    "eval_samples_per_class": _interval(1, None), "alpha": POSITIVE, "anchor_strength": NON_NEGATIVE,
    "sampling_guidance": NON_NEGATIVE, "erase_guidance": NON_NEGATIVE,
}
RANGE_EXEMPT = {"model_kwargs", "method"}  # free-form sections: their owners check them


# The accepted strings of keys that mean the same in every trainer's config.
KEY_CHOICES = {"mixed_precision": ("no", "fp16", "bf16"), "optim.name": ("adamw", "sgd"),
               "optim.lr_scaling": ("none", "linear256"), "sched.name": ("cosine", "constant"),
               "attention": ("sdpa", "xformers", "default")}  # the diffusion trainers' attention processors


def check_value(value, source: str, key: str) -> None:
    """ConfigError naming `source` and `key` when a number (or each number of a list) is outside RANGES[key],
    a string is not one of KEY_CHOICES[key], or output_dir is an existing file."""
    if key in KEY_CHOICES and value is not None and value not in KEY_CHOICES[key]:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(KEY_CHOICES[key])}, got {value!r}")
    if key == "output_dir" and isinstance(value, str) and Path(value).exists() and not Path(value).is_dir():
        raise ConfigError(f"{source}: output_dir {value} is a file; expected a folder (new, or holding a run)")
    parts = key.split(".")
    rule = RANGES.get(parts[-1].split("[")[0])
    if rule is None or parts[0] in RANGE_EXEMPT or value is None or isinstance(value, bool):
        return
    check, text = rule
    if parts[-1] in ("betas", "adam_betas") and isinstance(value, list) and len(value) != 2:
        raise ConfigError(f"{source}: {key} must be a list of two numbers in [0, 1), e.g. [0.9, 0.999], got {value!r}")
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not check(v):
            got = value if isinstance(value, list) else v
            raise ConfigError(f"{source}: {key} must be {text}{' each' if isinstance(value, list) else ''}, got {got!r}")


def coerce(value, tp, source: str, key: str):
    """`value` converted to type `tp` and checked (check_value: RANGES, KEY_CHOICES); ConfigError naming `source` and `key`.

    Strings that read as numbers (`1e-3`, `nan`) are accepted for float fields; `Any` accepts every value.
    """
    value = _coerce(value, tp, source, key)
    check_value(value, source, key)
    return value


def _coerce(value, tp, source: str, key: str):
    if tp is Any:
        return value
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], source, key)
    origin = typing.get_origin(tp) or tp
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if origin is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if origin is int and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
            raise TypeError
        if origin is str and isinstance(value, str):
            return value
        if origin is list and isinstance(value, list):
            inner = typing.get_args(tp)
            if inner and inner[0] is not Any:
                return [_coerce(v, inner[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
            return value
        if origin is dict and isinstance(value, dict):
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError):
        pass
    expected = getattr(origin, "__name__", str(origin))
    raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}")
