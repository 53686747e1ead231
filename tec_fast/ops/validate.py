"""Input checks shared by the public ops: every op validates shapes, dtypes and devices up front
and raises ``ValueError`` naming the argument.

Index *values* are checked without stalling a GPU step. On the Triton path the kernels that
read the indices check them (``tec_fast.kernels._common.check_index_flag``: on CUDA one
device-side assertion after the launch). On the reference path the check runs here, before the
op: exact on CPU tensors (``ValueError``), a device-side assertion on CUDA tensors
(``torch._assert_async``, no host synchronisation, CUDA-graph safe). ``TEC_FAST_CHECKS=1`` makes
both exact on CUDA too (one host synchronisation). Fake / meta tensors and ``torch.compile``
tracing skip the check here. The kernels read and write nothing for an out-of-range index in any
case.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Tuple

import torch

_SETTINGS = {}  # TEC_FAST_CHECKS, read once (``tec_fast.ops.dispatch.reload_environment`` re-reads it)


def checks_forced() -> bool:
    forced = _SETTINGS.get("checks")
    if forced is None:
        forced = _SETTINGS["checks"] = os.environ.get("TEC_FAST_CHECKS", "0") not in ("", "0")
    return forced


def check_tensor(t, name: str, ndim: int, float_: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if float_ and not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")


def _reads_values(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # checked first: dynamo must not trace is_fake
        return False
    if type(t) is torch.Tensor:  # a plain tensor (the common case): values unless on meta
        return t.device.type != "meta"
    from torch._subclasses.fake_tensor import is_fake
    return not (t.device.type == "meta" or is_fake(t))


def check_index(idx, name: str, shape: Tuple[int, ...], device) -> None:
    """``idx``: an int64 / int32 tensor of ``shape`` on ``device``. Its values are checked by
    whoever reads them: the Triton path's kernels, or ``check_index_values`` before the reference."""
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    dtype = idx.dtype
    if dtype is not torch.int64 and dtype is not torch.int32:
        raise ValueError(f"{name} must be int64 or int32, got dtype {dtype}")
    if idx.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the data is on {device}")


def check_index_values(idx: torch.Tensor, name: str, bound: int) -> None:
    """Values of ``idx`` in [0, ``bound``): exact on CPU and under ``TEC_FAST_CHECKS=1``
    (``ValueError``), else a device-side assertion; nothing read on fake / meta tensors."""
    if not idx.numel() or not _reads_values(idx):
        return
    if idx.device.type == "cpu":
        lo, hi = torch.aminmax(idx)  # CPU: two cheap reads
        lo, hi = lo.item(), hi.item()
    elif checks_forced():
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one host sync for both
    else:
        torch._assert_async(((idx >= 0) & (idx < bound)).all(), f"{name} holds indices outside [0, {bound})")
        return
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} holds indices in [{lo}, {hi}], outside [0, {bound})")


def as_int(value):
    """``value`` as a Python int where it is an integer (Python's, NumPy's; not a bool), else
    None (the caller's error names the argument)."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_real(value, name: str, low: float = -math.inf, open_low: bool = False) -> float:
    """``value``, a finite real number (a Python or NumPy scalar, not a bool) >= ``low`` (> with
    ``open_low``), as a float; else a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    # comparisons rather than math.isfinite: a float that torch.compile traces as a symbol (one
    # that changes between calls, e.g. a tau schedule) can be compared, not passed to math
    if not -math.inf < v < math.inf or v < low or (open_low and v == low):
        bound = "" if low == -math.inf else f" {'>' if open_low else '>='} {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return v


def check_eps(eps, name: str = "eps") -> float:
    """A LayerNorm's ``eps``: a finite real number >= 0, as a float (the common case, a float in
    range, in one comparison: the ops that take it run per block)."""
    if type(eps) is float and 0.0 <= eps < math.inf:  # NaN fails the comparison
        return eps
    return check_real(eps, name, 0.0)


def check_one_dtype(x: torch.Tensor, named, what: str, first: str = "x") -> None:
    """Outside autocast every tensor of ``named`` ((name, tensor) pairs, None skipped) has x's
    dtype; a ``ValueError`` names the first that does not (``what``: the tensors that must agree).
    Callers compare the dtypes themselves first and call this only on a mismatch."""
    if torch.is_autocast_enabled(x.device.type):
        return
    for name, t in named:
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first} has {x.dtype} (outside autocast {what} "
                             f"must share one dtype)")


def check_same_device(ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the first input is on {ref.device}")


def check_bias(bias, size: int, weight: torch.Tensor, like: torch.Tensor) -> None:
    """An optional bias of a projection with ``weight``: None, or ``size`` floating-point values
    on ``like``'s device."""
    if bias is None:
        return
    check_tensor(bias, "bias", 1)
    if bias.shape[0] != size:
        raise ValueError(f"bias must have shape ({size},) for weight {tuple(weight.shape)}, got "
                         f"{tuple(bias.shape)}")
    check_same_device(like, bias=bias)
