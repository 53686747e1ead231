"""Which implementation an op runs, and why the others were skipped.

``TEC_FAST_KERNELS=auto|triton|reference`` (default auto): auto takes the Triton path for CUDA
tensors when Triton imports; triton forces it (on CPU tensors that needs ``TRITON_INTERPRET=1``);
reference always runs plain torch.
"""
from __future__ import annotations

import functools
import os
from typing import List, Tuple

import torch

MODES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("TEC_FAST_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"TEC_FAST_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


@functools.lru_cache(maxsize=None)
def triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton does not import ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not_fast(op: str, t: torch.Tensor) -> List[str]:
    """Reasons the Triton path of ``op`` cannot run on tensor ``t`` (empty list: it can)."""
    reasons = []
    mode = kernel_mode()
    if mode == "reference":
        reasons.append("TEC_FAST_KERNELS=reference")
    ok, msg = triton_status()
    if not ok:
        reasons.append(msg)
    if t.device.type != "cuda":
        if mode != "triton":
            reasons.append(f"tensor on {t.device.type} (auto uses Triton only on CUDA tensors)")
        elif not interpreter_on():
            reasons.append(f"tensor on {t.device.type} and TRITON_INTERPRET is not set")
    return reasons


def use_fast_path(op: str, t: torch.Tensor) -> bool:
    return not why_not_fast(op, t)
