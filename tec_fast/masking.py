"""Public alias of ``tec_fast.models.masking`` (a stable import path for users' code)."""
from tec_fast.models.masking import *  # noqa: F401,F403
from tec_fast.models.masking import __all__  # noqa: F401
