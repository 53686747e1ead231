"""Which implementation an op runs, and why the others were skipped.

``TEC_FAST_KERNELS=auto|triton|reference`` (default auto): auto takes the Triton path for CUDA
tensors when Triton imports; triton forces it (on CPU tensors that needs ``TRITON_INTERPRET=1``
set before ``tec_fast`` is imported); reference always runs plain torch.

The dispatcher only walks lists: the generic reasons (mode, Triton, device) come from here, the
op's own limits (dtype, head width, tile size, ...) from ``not_supported_reasons`` in its kernel
file. ``why_not_fast`` returns them all, ``use_fast_path`` is their emptiness, and
``dispatch_report`` tells ``python -m tec_fast.info`` what each op in ``registry.OPS`` runs here.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple

import torch

from tec_fast.ops.registry import OPS

MODES = ("auto", "triton", "reference")

# Filled once by ``register_kernels`` (plain containers that torch.compile can read).
_TRITON_STATUS: List[Tuple[bool, str]] = []
_KERNELS: Dict[str, ModuleType] = {}
_KERNEL_ERRORS: Dict[str, str] = {}


def kernel_mode() -> str:
    mode = os.environ.get("TEC_FAST_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"TEC_FAST_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


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


def register_kernels() -> None:
    """Import every op's kernel module, which registers its ``torch.ops.tec_fast.*`` custom ops.
    Runs once, at ``import tec_fast.ops``; a kernel module that fails to import is recorded as a
    reason (its op then runs the reference), never an import error of the package."""
    if _KERNELS or _KERNEL_ERRORS or not triton_status()[0]:
        return
    for spec in OPS.values():
        try:
            _KERNELS[spec.name] = importlib.import_module(f"tec_fast.kernels.{spec.kernel}")
        except Exception as exc:
            _KERNEL_ERRORS[spec.name] = (f"kernels/{spec.kernel}.py does not import "
                                         f"({type(exc).__name__}: {exc})")


def fast_impl(op: str) -> Callable:
    """The Triton path of ``op`` (call only when ``use_fast_path`` said yes)."""
    return getattr(_KERNELS[op], op)


def _reasons(op: str, device_type: str, dtype: torch.dtype, shape: Tuple[int, ...], **info) -> List[str]:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {tuple(OPS)}")
    reasons = []
    mode = kernel_mode()
    if mode == "reference":
        reasons.append("TEC_FAST_KERNELS=reference")
    ok, msg = triton_status()
    if not ok:
        return reasons + [msg]
    if op in _KERNEL_ERRORS:
        return reasons + [_KERNEL_ERRORS[op]]
    if device_type != "cuda":
        if mode != "triton":
            reasons.append(f"tensor on {device_type} (auto uses Triton only on CUDA tensors)")
        elif not interpreter_on():
            reasons.append(f"tensor on {device_type} and TRITON_INTERPRET is not set")
    return reasons + _KERNELS[op].not_supported_reasons(dtype, tuple(shape), **info)


def why_not_fast(op: str, t: torch.Tensor, **info) -> List[str]:
    """Reasons the Triton path of ``op`` cannot run on tensor ``t`` (empty list: it can).
    ``info`` carries op-specific sizes the tensor alone does not show (e.g. ``topk``)."""
    return _reasons(op, t.device.type, t.dtype, tuple(t.shape), **info)


def use_fast_path(op: str, t: torch.Tensor, **info) -> bool:
    return not why_not_fast(op, t, **info)


def dispatch_report(device: Optional[str] = None,
                    dtype: torch.dtype = torch.bfloat16) -> Dict[str, Tuple[str, List[str]]]:
    """For each op: ("triton" | "reference", reasons the Triton path is skipped) for ViT-B/16
    sized inputs of ``dtype`` on ``device`` (default: cuda when available, else cpu). Asks only
    whether a CUDA device exists; does not initialise CUDA."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    report = {}
    for spec in OPS.values():
        reasons = _reasons(spec.name, device_type, dtype, spec.report_shape, **spec.report_info)
        report[spec.name] = ("reference" if reasons else "triton", reasons)
    return report


def format_dispatch_report(device: Optional[str] = None) -> str:
    """Human-readable ``dispatch_report`` for ``python -m tec_fast.info``."""
    lines = [f"kernel ops (TEC_FAST_KERNELS={kernel_mode()}, TRITON_INTERPRET="
             f"{os.environ.get('TRITON_INTERPRET', 'unset')}):"]
    for op, (backend, reasons) in dispatch_report(device).items():
        lines.append(f"  {op:<17} {backend}" + (f"  ({'; '.join(reasons)})" if reasons else ""))
    return "\n".join(lines)
