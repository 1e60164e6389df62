"""Training: YAML configs with overrides, an Accelerate training loop, and the digits demo."""
from .config import (
    ConfigError,
    DataConfig,
    MethodSection,
    OptimConfig,
    SchedConfig,
    TrainConfig,
    load_config,
    to_dict,
    valid_keys,
)
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .trainer import evaluate, find_checkpoint, train

__all__ = [
    "ConfigError",
    "DataConfig",
    "MethodSection",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "find_checkpoint",
    "load_config",
    "to_dict",
    "train",
    "valid_keys",
]
