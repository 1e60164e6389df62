"""Small models bundled with petl_vision."""
from .demo_vit import DEMO_VIT_KWARGS, DEMO_VIT_PATH, create_demo_vit

__all__ = ["DEMO_VIT_KWARGS", "DEMO_VIT_PATH", "create_demo_vit"]
