"""tec_fast: fast TEC (Target-Enhanced Conditional) pretraining of ViTs from an existing one."""
from .config import TECConfig, ViTConfig
from .base import BaseModel, BaseTargets
from .model import TECModel

__version__ = "0.1.0"
__all__ = ["ViTConfig", "TECConfig", "BaseModel", "BaseTargets", "TECModel", "__version__"]
