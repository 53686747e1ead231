"""Which implementation an op runs, and why the others were skipped.

``TEC_FAST_KERNELS=auto|triton|reference`` (default auto): auto takes the Triton path for CUDA
tensors when Triton imports; triton forces it (on CPU tensors that needs ``TRITON_INTERPRET=1``
set before the kernels are first imported); reference always runs plain torch.

Each op can also be refused by its own limits (dtype, head width, ...): ``why_not_fast`` lists
every reason, ``use_fast_path`` is its emptiness, and ``dispatch_report`` tells
``python -m tec_fast.info`` what each op would run on this machine.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

MODES = ("auto", "triton", "reference")
OPS = ("masked_gather", "scatter_masked", "patch_norm_mse", "relation_targets", "relation_loss",
       "encoder_adapter")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256        # relation kernels hold a [1+k, d] query tile in registers
MAX_RELATION_ROWS = 128   # 1 + topk
MAX_ADAPTER_TILE = 65536  # next_pow2(D) * next_pow2(C): one token's D*C values in registers


def kernel_mode() -> str:
    mode = os.environ.get("TEC_FAST_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"TEC_FAST_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


_TRITON_STATUS: List[Tuple[bool, str]] = []  # filled on first use (a plain cache torch.compile reads)


def triton_status() -> Tuple[bool, str]:
    if not _TRITON_STATUS:
        try:
            import triton
            _TRITON_STATUS.append((True, f"triton {triton.__version__}"))
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_STATUS.append((False, f"triton does not import ({type(exc).__name__}: {exc})"))
    return _TRITON_STATUS[0]


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _dtype_reason(dtype: torch.dtype) -> List[str]:
    if dtype not in KERNEL_DTYPES:
        return [f"dtype {dtype} (the Triton kernels take float32, float16, bfloat16)"]
    return []


def _relation_limits(dtype, shape, topk: Optional[int] = None, **_) -> List[str]:
    reasons = _dtype_reason(dtype)
    if len(shape) == 4 and shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {shape[-1]} > {MAX_HEAD_DIM}")
    if topk is not None and 1 + topk > MAX_RELATION_ROWS:
        reasons.append(f"1 + topk = {1 + topk} rows > {MAX_RELATION_ROWS}")
    return reasons


def _adapter_limits(dtype, shape, **_) -> List[str]:
    reasons = _dtype_reason(dtype)
    if len(shape) == 4 and _pow2(shape[0]) * _pow2(shape[3]) > MAX_ADAPTER_TILE:
        reasons.append(f"depth x width {shape[0]} x {shape[3]} too large for one token's tile "
                       f"(next powers of two multiply to more than {MAX_ADAPTER_TILE})")
    return reasons


def _plain_limits(dtype, shape, **_) -> List[str]:
    return _dtype_reason(dtype)


_OP_LIMITS: Dict[str, Callable[..., List[str]]] = {
    "masked_gather": _plain_limits,
    "scatter_masked": _plain_limits,
    "patch_norm_mse": _plain_limits,
    "relation_targets": _relation_limits,
    "relation_loss": _relation_limits,
    "encoder_adapter": _adapter_limits,
}


def _reasons(op: str, device_type: str, dtype: torch.dtype, shape: Tuple[int, ...], **info) -> List[str]:
    if op not in _OP_LIMITS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")
    reasons = []
    mode = kernel_mode()
    if mode == "reference":
        reasons.append("TEC_FAST_KERNELS=reference")
    ok, msg = triton_status()
    if not ok:
        reasons.append(msg)
    if device_type != "cuda":
        if mode != "triton":
            reasons.append(f"tensor on {device_type} (auto uses Triton only on CUDA tensors)")
        elif not interpreter_on():
            reasons.append(f"tensor on {device_type} and TRITON_INTERPRET is not set")
    reasons.extend(_OP_LIMITS[op](dtype, tuple(shape), **info))
    return reasons


def why_not_fast(op: str, t: torch.Tensor, **info) -> List[str]:
    """Reasons the Triton path of ``op`` cannot run on tensor ``t`` (empty list: it can).
    ``info`` carries op-specific sizes the tensor alone does not show (e.g. ``topk``)."""
    return _reasons(op, t.device.type, t.dtype, tuple(t.shape), **info)


def use_fast_path(op: str, t: torch.Tensor, **info) -> bool:
    return not why_not_fast(op, t, **info)


# ViT-B/16 shapes of each op's first argument, for the report
_REPORT_SHAPES = {
    "masked_gather": (256, 196, 768),
    "scatter_masked": (256, 49, 512),
    "patch_norm_mse": (256, 196, 768),
    "relation_targets": (256, 12, 197, 64),
    "relation_loss": (256, 12, 197, 64),
    "encoder_adapter": (12, 256, 50, 768),
}


def dispatch_report(device: Optional[str] = None,
                    dtype: torch.dtype = torch.bfloat16) -> Dict[str, Tuple[str, List[str]]]:
    """For each op: ("triton" | "reference", reasons the Triton path is skipped) for ViT-B/16
    sized inputs of ``dtype`` on ``device`` (default: cuda when available, else cpu). Asks only
    whether a CUDA device exists; does not initialise CUDA."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    report = {}
    for op, shape in _REPORT_SHAPES.items():
        reasons = _reasons(op, device_type, dtype, shape, topk=15)
        report[op] = ("reference" if reasons else "triton", reasons)
    return report


def format_dispatch_report(device: Optional[str] = None) -> str:
    """Human-readable ``dispatch_report`` for ``python -m tec_fast.info``."""
    lines = [f"kernel ops (TEC_FAST_KERNELS={kernel_mode()}, TRITON_INTERPRET="
             f"{os.environ.get('TRITON_INTERPRET', 'unset')}):"]
    for op, (backend, reasons) in dispatch_report(device).items():
        lines.append(f"  {op:<17} {backend}" + (f"  ({'; '.join(reasons)})" if reasons else ""))
    return "\n".join(lines)
