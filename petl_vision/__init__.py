"""petl_vision: parameter-efficient transfer learning for vision and multimodal models.

    import timm, petl_vision as pv
    model = pv.apply(timm.create_model("vit_base_patch16_224", num_classes=100), "ssf")
    print(pv.summary(model))
    pv.save_adapter(model, "runs/ssf")

Every registered method's config class is exported here under its own name (`pv.SSFConfig`,
`pv.VPTConfig`, ...): a new file under `petl_vision/methods/` needs no edit of this file.
"""
from . import diffusers  # noqa: F401  (pipeline plugin: pv.diffusers.load_sara, ...; imports diffusers lazily)
from . import methods as _methods  # noqa: F401  (registers every method)
from .core.api import Summary, apply, can_merge, merge, summary
from .core.errors import AdapterFileError, AdapterMismatchError, ConfigError, MergeError, UnknownMethodError, UnsupportedHostError
from .core.io import load_adapter, push_to_hub, save_adapter
from .core.registry import Method, MethodConfig, get_config_class, get_method, list_methods, make_config, register_method

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError", "AdapterMismatchError", "ConfigError", "MergeError", "Method", "MethodConfig", "Summary",
    "UnknownMethodError", "UnsupportedHostError", "apply", "can_merge", "get_config_class", "get_method",
    "list_methods", "load_adapter", "make_config", "merge", "push_to_hub", "register_method", "save_adapter", "summary",
]

for _name in list_methods():
    _config_class = get_config_class(_name)
    globals()[_config_class.__name__] = _config_class
    __all__.append(_config_class.__name__)
