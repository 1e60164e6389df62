"""The base model an adapter was trained on, and the model card (README.md) written beside it."""
from __future__ import annotations

import json

from torch import nn

from .hub import is_repo_id


def base_model_info(model: nn.Module) -> dict | None:
    """What names the pretrained host, or None when nothing does.

    timm: ``pretrained_cfg`` (architecture, tag, hf_hub_id); diffusers: ``config._name_or_path``;
    open_clip: ``pretrained_cfg`` / ``name`` when the loader recorded them.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    library = "open_clip" if "open_clip" in type(model).__module__ else "timm"
    if isinstance(cfg, dict) and cfg.get("architecture"):  # timm; an open_clip loader may record the same keys
        return _clean({"library": library, "name": cfg.get("architecture"), "tag": cfg.get("tag"),
                       "hf_hub_id": cfg.get("hf_hub_id") or (cfg.get("hf_hub") or "").strip("/")})
    if isinstance(cfg, dict) and library == "open_clip" and cfg.get("hf_hub"):  # open_clip's own pretrained config
        return _clean({"library": library, "name": cfg["hf_hub"].strip("/"), "hf_hub_id": cfg["hf_hub"].strip("/")})
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or (config.get("_name_or_path") if isinstance(config, dict) else None)
    if isinstance(name, str) and name:
        return _clean({"library": "diffusers" if type(model).__module__.startswith("diffusers.") else type(model).__module__.split(".")[0],
                       "name": name, "hf_hub_id": name if is_repo_id(name) else None})
    return None


def _clean(info: dict) -> dict:
    return {k: str(v) for k, v in info.items() if v not in (None, "")}


def base_model_id(info: dict | None) -> str | None:
    """The Hub repo id of the base model (for peft's base_model_name_or_path and the card), or a name."""
    if not info:
        return None
    return info.get("hf_hub_id") or info.get("name")


def model_card(meta: dict, trainable: int, total: int, metrics: dict | None = None,
               repo_id: str | None = None, peft_files: bool = False) -> str:
    """README.md text: method(s), base model, trainable count, metrics, how to load it."""
    methods = [m["name"] for m in meta["methods"]]
    base = meta.get("base_model") or {}
    hub_id = base.get("hf_hub_id")
    tags = ["petl_vision", *methods] + (["peft", "lora"] if peft_files and "lora" not in methods else ["peft"] if peft_files else [])
    front = ["---", "library_name: petl_vision", "tags:"] + [f"- {t}" for t in dict.fromkeys(tags)]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front.append("---")
    base_text = _describe_base(base, meta["host"]["class"])
    lines = [*front, "", f"# {' + '.join(methods)} adapter for {base.get('name') or meta['host']['class']}", "",
             f"- Method(s): {', '.join(f'`{m}`' for m in methods)}",
             f"- Base model: {base_text}",
             f"- Host class: `{meta['host']['class']}`",
             f"- Trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.3f}%)", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += ["## Configs", "", "```json", json.dumps(meta["methods"], indent=1), "```", "", "## Load", "", "```python"]
    where = repo_id or "path/to/this/folder"
    if base.get("library") == "timm" and base.get("name"):
        name = base["name"] + (f".{base['tag']}" if base.get("tag") else "")
        lines += ["import timm, petl_vision as pv", "",
                  f'model = timm.create_model("{name}", pretrained=True, num_classes=...)  # as in training']
    elif base.get("library") == "diffusers" and base.get("name"):
        lines += ["from diffusers import UNet2DConditionModel", "import petl_vision as pv", "",
                  f'model = UNet2DConditionModel.from_pretrained("{base["name"]}", subfolder="unet")']
    else:
        lines += ["import petl_vision as pv", "", "model = ...  # the base model the adapter was trained on"]
    lines += [f'model = pv.load_adapter(model, "{where}")', "```", ""]
    if peft_files:
        lines += ["The folder also holds peft's `adapter_config.json` and `adapter_model.safetensors`:", "",
                  "```python", "from peft import PeftModel", "", f'model = PeftModel.from_pretrained(model, "{where}")', "```", ""]
    return "\n".join(lines)


def _describe_base(base: dict, host_class: str) -> str:
    if not base:
        return f"not recorded (a `{host_class}`)"
    text = f"{base.get('library', '?')} `{base.get('name')}`"
    if base.get("tag"):
        text += f" (tag `{base['tag']}`)"
    if base.get("hf_hub_id"):
        text += f", Hub [{base['hf_hub_id']}](https://huggingface.co/{base['hf_hub_id']})"
    return text
