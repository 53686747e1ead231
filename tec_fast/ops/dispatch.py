"""Which implementation an op runs, and why the others were skipped.

``TEC_FAST_KERNELS=auto|triton|reference`` (default auto), read once, at the first op call
(an unknown value raises there; ``set_kernel_mode`` changes it later; ``reload_environment`` re-reads it):

* auto: on CUDA tensors an op takes its Triton path only where the committed device benchmark
  for that GPU class measured it faster than the reference (``measured``: forward alone in
  inference, forward + backward when grad mode is on). On a GPU class without a table, and on
  CPU tensors, auto runs the reference.
* triton: forces the Triton path; an op that cannot take it (no Triton, a CPU tensor without
  ``TRITON_INTERPRET=1``, a size or dtype the kernel does not support) raises ``RuntimeError``
  naming the op and the reasons instead of quietly running the reference.
* reference: always plain torch.

The dispatcher only walks lists: the generic reasons (mode, Triton, device, measurement) come
from here, the op's own limits (dtype, head width, tile size, ...) from ``not_supported_reasons``
in its kernel file. Decisions depend only on (op, device, dtype, shape, sizes, grad mode) and are
cached, so a call costs one dictionary lookup. ``dispatch_report`` tells
``python -m tec_fast.info`` what each op in ``registry.OPS`` runs here and the measured ratio
behind each choice.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import re
import sys
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple

import torch

from tec_fast.ops.registry import OPS

MODES = ("auto", "triton", "reference")
MEASURED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "measured")
# A Triton path must measure at least this much faster than the reference (forward + backward
# where trained) before auto takes it: below, the difference is within run-to-run noise.
MIN_SPEEDUP = 1.0

# GPU classes a measured table is filed under, matched in this order against the device name
GPU_CLASSES = ("H200", "H100", "GH200", "B200", "A100", "L40S", "L4", "A10")

_SETTINGS: Dict[str, object] = {}          # mode, interpret: read from the environment once
_TRITON_STATUS: List[Tuple[bool, str]] = []
_KERNELS: Dict[str, ModuleType] = {}
_KERNEL_ERRORS: Dict[str, str] = {}
_FAST: Dict[str, Callable] = {}
_DECISIONS: Dict[tuple, Tuple[bool, Tuple[str, ...]]] = {}
_TABLES: Dict[str, dict] = {}              # GPU class -> measured table
_DEVICE_CLASS: Dict[int, str] = {}


def _read_mode() -> str:
    mode = os.environ.get("TEC_FAST_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"TEC_FAST_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


def reload_environment() -> None:
    """Re-read ``TEC_FAST_KERNELS``, ``TRITON_INTERPRET``, ``TEC_FAST_CHECKS`` and
    ``TEC_FAST_LAUNCH`` at the next op call (tests that change the environment call this;
    ``set_kernel_mode`` is the way for code)."""
    from tec_fast.ops import validate
    _SETTINGS.clear()
    validate._SETTINGS.clear()
    _DECISIONS.clear()
    common = sys.modules.get("tec_fast.kernels._common")
    if common is not None:
        common._LAUNCH_SETTINGS.clear()
        common._CHECK_SETTINGS.clear()


def set_kernel_mode(mode: Optional[str]) -> None:
    """Set the kernel path for this process: ``auto``, ``triton`` or ``reference``; None re-reads
    ``TEC_FAST_KERNELS``. Case and surrounding spaces do not matter, as in the variable."""
    if isinstance(mode, str):
        mode = mode.strip().lower()
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    reload_environment()
    if mode is not None:
        _SETTINGS["mode"] = mode


def kernel_mode() -> str:
    mode = _SETTINGS.get("mode")
    if mode is None:
        mode = _SETTINGS["mode"] = _read_mode()
    return mode


def interpreter_on() -> bool:
    on = _SETTINGS.get("interpret")
    if on is None:
        on = _SETTINGS["interpret"] = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return on


def triton_status() -> Tuple[bool, str]:
    if not _TRITON_STATUS:
        try:
            import triton
            _TRITON_STATUS.append((True, f"triton {triton.__version__}"))
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_STATUS.append((False, f"triton does not import ({type(exc).__name__}: {exc})"))
    return _TRITON_STATUS[0]


def register_kernels() -> None:
    """Import every op's kernel module, which registers its ``torch.ops.tec_fast.*`` custom ops.
    Runs once, at ``import tec_fast.ops``; a kernel module that fails to import is recorded as a
    reason (its op then runs the reference), never an import error of the package."""
    if _KERNELS or _KERNEL_ERRORS or not triton_status()[0]:
        return
    for spec in OPS.values():
        try:
            _KERNELS[spec.name] = importlib.import_module(f"tec_fast.kernels.{spec.kernel}")
            _FAST[spec.name] = getattr(_KERNELS[spec.name], spec.name)
        except Exception as exc:
            _KERNEL_ERRORS[spec.name] = (f"kernels/{spec.kernel}.py does not import "
                                         f"({type(exc).__name__}: {exc})")


def fast_impl(op: str, form: Optional[str] = None) -> Callable:
    """The Triton path of ``op`` (call only when ``use_fast_path`` said yes), or of another form
    of it that its kernel module defines (``form``: ``vit_block``'s ``vit_blocks``)."""
    return _FAST[op] if form is None else getattr(_KERNELS[op], form)


# ---- the measured tables ---------------------------------------------------------------------

def gpu_class(device_name: str) -> str:
    """The class a GPU's measurements are filed under: ``H200`` for "NVIDIA H200", ``H100`` for
    "NVIDIA H100 80GB HBM3", ``A100`` for "NVIDIA A100-SXM4-80GB" (a whole word of the name, so
    "NVIDIA GH200 480GB" is GH200, not H200); other names as they are, spaces replaced by
    underscores."""
    words = set(re.split(r"[\s\-_]+", device_name.upper()))
    return next((c for c in GPU_CLASSES if c in words), device_name.replace(" ", "_"))


def load_tables(directory: str = MEASURED_DIR) -> Dict[str, dict]:
    """Read every ``<class>.json`` table in ``directory`` (done once at import)."""
    _TABLES.clear()
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        try:
            with open(path) as f:
                table = json.load(f)
            _TABLES[table["gpu_class"]] = table
        except (OSError, ValueError, KeyError):  # a broken table: that class counts as unmeasured
            continue
    _DECISIONS.clear()
    return _TABLES


@torch.compiler.assume_constant_result  # a traced call reads the name at trace time, no graph break
def _cuda_class(index: Optional[int]) -> str:
    index = torch.cuda.current_device() if index is None else index
    cls = _DEVICE_CLASS.get(index)
    if cls is None:
        cls = _DEVICE_CLASS[index] = gpu_class(torch.cuda.get_device_name(index))
    return cls


def measured(op: str, gpu: str, backward: bool) -> Optional[dict]:
    """The measured entry behind auto's choice for ``op`` on GPU class ``gpu``: ``speedup``
    (reference time / Triton time), ``shape``, ``dtype``, ``pass`` and where it was measured;
    None when that GPU class or that op is unmeasured."""
    table = _TABLES.get(gpu)
    if table is None:
        return None
    entries = table["ops"].get(op, {})
    # grad mode: forward + backward, except for an op without a backward (its forward is all of it)
    return entries.get("fwdbwd" if backward and OPS[op].differentiable else "fwd")


def _measured_reasons(op: str, gpu: str, backward: bool) -> List[str]:
    entry = measured(op, gpu, backward)
    what = "forward + backward" if backward else "forward"
    if entry is None:
        if gpu not in _TABLES:
            return [f"{gpu} is unmeasured (auto runs the reference on GPU classes without a "
                    f"benchmark table; run benchmarks/run_device.sh there)"]
        return [f"{op} {what} not measured on {gpu}"]
    if entry["speedup"] < MIN_SPEEDUP:
        return [f"measured {entry['speedup']:.2f}x the reference on {gpu} ({entry['pass']}, "
                f"{entry['shape']}, {entry['dtype']})"]
    return []


# ---- decisions -------------------------------------------------------------------------------

def _reasons(op: str, device: torch.device, dtype: torch.dtype, shape: Tuple[int, ...], backward: bool,
             gpu: Optional[str] = None, **info) -> List[str]:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {tuple(OPS)}")
    mode = kernel_mode()
    if mode == "reference":
        return ["TEC_FAST_KERNELS=reference"]
    ok, msg = triton_status()
    if not ok:
        return [msg]
    if op in _KERNEL_ERRORS:
        return [_KERNEL_ERRORS[op]]
    reasons = []
    if device.type == "meta":
        reasons.append("tensor on meta (no data for a kernel to read; the reference computes shapes)")
    elif device.type != "cuda":
        if mode != "triton":
            reasons.append(f"tensor on {device.type} (auto uses Triton only on CUDA tensors)")
        elif not interpreter_on():
            reasons.append(f"tensor on {device.type} and TRITON_INTERPRET is not set")
    reasons += _KERNELS[op].not_supported_reasons(dtype, tuple(shape), **info)
    if not reasons and mode == "auto":
        reasons += _measured_reasons(op, gpu or _cuda_class(device.index), backward)
    return reasons


def _decide(op: str, t: torch.Tensor, info: dict) -> Tuple[bool, Tuple[str, ...]]:
    backward = torch.is_grad_enabled()
    if torch.compiler.is_compiling():  # traced once per graph: no cache for dynamo to guard on
        reasons = tuple(_reasons(op, t.device, t.dtype, tuple(t.shape), backward, **info))
        return not reasons, reasons
    key = (op, t.device, t.dtype, t.shape, backward, *info.items())
    hit = _DECISIONS.get(key)
    if hit is None:
        reasons = tuple(_reasons(op, t.device, t.dtype, tuple(t.shape), backward, **info))
        hit = _DECISIONS[key] = (not reasons, reasons)
    if hit[0]:  # per call: a torch.func transform, the current device
        if _functorch_active():
            return _IN_TRANSFORM
        if t.is_cuda:
            return _on_current_device(t.device)
    return hit


_functorch_active = torch._C._are_functorch_transforms_active
_IN_TRANSFORM = (False, ("inside a torch.func transform (grad, vmap, jacrev, ...), which the kernels' "
                         "autograd.Functions do not support; the reference runs there",))


def _on_current_device(device: torch.device) -> Tuple[bool, Tuple[str, ...]]:
    """A Triton launch runs on the current CUDA device (its stream, its copy of the kernel), so
    a tensor on another one would be handed to a kernel that cannot read it. (The backward is
    run with the tensors' device current by autograd.)"""
    current = torch.cuda.current_device()
    if device.index == current:
        return _FAST_OK
    return False, (f"tensor on cuda:{device.index} while the current CUDA device is cuda:{current} (Triton "
                   f"launches on the current device): make it current with torch.cuda.set_device"
                   f"({device.index}) or `with torch.cuda.device({device.index}):`",)


_FAST_OK = (True, ())


def why_not_fast(op: str, t: torch.Tensor, **info) -> List[str]:
    """Reasons the Triton path of ``op`` is not taken for tensor ``t`` (empty list: it is).
    ``info`` carries op-specific sizes the tensor alone does not show (e.g. ``topk``)."""
    return list(_decide(op, t, info)[1])


def use_fast_path(op: str, t: torch.Tensor, **info) -> bool:
    """Whether ``op`` takes its Triton path for ``t``. With ``TEC_FAST_KERNELS=triton`` a call
    that cannot take it raises ``RuntimeError`` with the reasons."""
    fast, reasons = _decide(op, t, info)
    if not fast and _SETTINGS.get("mode") == "triton" and reasons:
        raise RuntimeError(f"TEC_FAST_KERNELS=triton but {op} cannot run its Triton kernels on this input "
                           f"({t.device.type} {t.dtype} {tuple(t.shape)}): {'; '.join(reasons)}")
    return fast


def _report_gpu(dev: torch.device, gpu: Optional[str]) -> Optional[str]:
    if dev.type != "cuda" or gpu is not None:
        return gpu
    return _cuda_class(dev.index) if torch.cuda.is_available() else "an unnamed GPU"


def dispatch_report(device: Optional[str] = None, dtype: torch.dtype = torch.bfloat16,
                    backward: bool = True, gpu: Optional[str] = None) -> Dict[str, Tuple[str, List[str]]]:
    """For each op: ("triton" | "reference", reasons the Triton path is skipped) for ViT-B/16
    sized inputs of ``dtype`` on ``device`` (default: cuda when available, else cpu), in
    training (``backward``) or inference; ``gpu`` names the GPU class whose measurements auto
    follows (default: the device's). Asks only whether a CUDA device exists and its name."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    gpu = _report_gpu(dev, gpu)
    report = {}
    for spec in OPS.values():
        reasons = _reasons(spec.name, dev, dtype, spec.report_shape, backward, gpu, **spec.report_info)
        report[spec.name] = ("reference" if reasons else "triton", reasons)
    return report


def measured_report(device: Optional[str] = None, gpu: Optional[str] = None) -> Dict[str, Dict[str, Optional[dict]]]:
    """Op -> {"fwd": entry, "fwdbwd": entry} of the measured table of ``gpu`` (default: the
    class of ``device``, cuda when available); entries None where unmeasured; empty on a CPU
    without ``gpu``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = _report_gpu(torch.device(device), gpu)
    if gpu is None:
        return {}
    entries = (_TABLES.get(gpu) or {}).get("ops", {})
    return {op: {"fwd": entries.get(op, {}).get("fwd"), "fwdbwd": entries.get(op, {}).get("fwdbwd")} for op in OPS}


def format_dispatch_report(device: Optional[str] = None, gpu: Optional[str] = None) -> str:
    """Human-readable ``dispatch_report`` for ``python -m tec_fast.info``."""
    lines = [f"kernel ops (TEC_FAST_KERNELS={kernel_mode()}, TRITON_INTERPRET="
             f"{os.environ.get('TRITON_INTERPRET', 'unset')}):"]
    for op, (backend, reasons) in dispatch_report(device, gpu=gpu).items():
        lines.append(f"  {op:<17} {backend}" + (f"  ({'; '.join(reasons)})" if reasons else ""))
    return "\n".join(lines)


load_tables()
