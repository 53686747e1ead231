"""tec_fast: fast TEC (Target-Enhanced Conditional) pretraining of ViTs from an existing one.

The public API is the five names below; the subpackages are documented in ``docs/architecture.md``.
"""
from tec_fast.config import TECConfig, ViTConfig
from tec_fast.models.base import BaseModel, BaseTargets
from tec_fast.models.tec import TECModel

__version__ = "0.1.0"
__all__ = ["ViTConfig", "TECConfig", "BaseModel", "BaseTargets", "TECModel", "__version__"]
