"""Public alias of ``tec_fast.models.native`` (a stable import path for users' code)."""
from tec_fast.models.native import *  # noqa: F401,F403
from tec_fast.models.native import __all__  # noqa: F401
