"""Loading the compiled packing extension (``tec_fast._C``, ``tec_fast._C_cuda``) once, with one
warning and a recorded reason when it is missing or built for another torch."""
from __future__ import annotations

import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

import tec_fast.packing.library  # noqa: F401  (the schemas must exist before the kernels register)

_BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"


def _load_extensions() -> Tuple[Optional[object], Dict[str, object]]:
    """Import tec_fast._C (and tec_fast._C_cuda where built and torch has CUDA); importing
    registers their kernels. Returns (the CPU module or None, status)."""
    status: Dict[str, object] = {
        "built": False, "loaded": False, "openmp": False, "reason": "",
        "cuda_built": False, "cuda": False, "cuda_reason": "",
        "built_for": None, "present": {"torch": torch.__version__, "cuda": torch.version.cuda}}
    try:
        info = json.loads(_BUILD_INFO.read_text())
    except FileNotFoundError:
        info = {}
        status["reason"] = (f"no compiled extension ({_BUILD_INFO.name} not found; build it with "
                            "`pip install --no-build-isolation -e .`)")
    except (OSError, ValueError) as exc:
        info = {}
        status["reason"] = f"unreadable {_BUILD_INFO.name} ({exc})"
    built_torch, built_cuda = str(info.get("torch")), info.get("torch_cuda")
    status["built"] = bool(info.get("cpu", {}).get("built"))  # what was built, loaded or not
    status["cuda_built"] = bool(info.get("cuda", {}).get("built"))
    if os.environ.get("TEC_FAST_NO_EXT", "0") not in ("", "0"):
        status["reason"] = status["cuda_reason"] = "TEC_FAST_NO_EXT is set"
        return None, status
    cpu_ext = None
    if info:
        status["built_for"] = {"torch": built_torch, "cuda": built_cuda}
        if built_torch.split("+")[0] != torch.__version__.split("+")[0]:
            status["reason"] = (f"extension built for torch {built_torch}, but torch "
                                f"{torch.__version__} is installed: rebuild it")
        elif not status["built"]:
            status["reason"] = ("C++ extension was not built: "
                                f"{info.get('cpu', {}).get('reason') or 'no reason recorded'}")
        else:
            try:
                cpu_ext = importlib.import_module("tec_fast._C")
                status["loaded"] = True
                status["openmp"] = bool(cpu_ext.build_facts().get("openmp"))
            except Exception as exc:  # ImportError, undefined symbols of another torch, ...
                status["reason"] = (f"tec_fast._C (built for torch {built_torch}) does not load "
                                    f"on torch {torch.__version__}: {type(exc).__name__}: {exc}")
    if not status["cuda_built"]:
        status["cuda_reason"] = ("CUDA part not built: "
                                 f"{info.get('cuda', {}).get('reason') or status['reason']}")
    elif torch.version.cuda is None:
        status["cuda_reason"] = f"CUDA part built for CUDA {built_cuda}, but this torch has no CUDA"
    elif status["loaded"]:  # same torch as the CPU part, checked above
        try:
            importlib.import_module("tec_fast._C_cuda")
            status["cuda"] = True
        except Exception as exc:
            status["cuda_reason"] = (f"tec_fast._C_cuda (built for CUDA {built_cuda}) does not "
                                     f"load on torch {torch.__version__} / CUDA "
                                     f"{torch.version.cuda}: {type(exc).__name__}: {exc}")
    else:
        status["cuda_reason"] = status["reason"]
    problems = [status["reason"]] if not status["loaded"] else []
    if status["cuda_built"] and torch.version.cuda is not None and not status["cuda"] and \
            status["loaded"]:
        problems.append(status["cuda_reason"])
    if problems:
        warnings.warn(f"tec_fast.packing: {'; '.join(problems)} (using the plain-torch packing "
                      "kernels there)", RuntimeWarning, stacklevel=3)
    return cpu_ext, status


_C, _STATUS = _load_extensions()


def extension_status() -> Dict[str, object]:
    """What ``python -m tec_fast.info`` shows. Keys: built / loaded / openmp / reason (the C++
    part: built at install, imported now, parallel, why not in use), cuda_built / cuda /
    cuda_reason (the same for the CUDA part), built_for / present (torch and CUDA versions)."""
    return dict(_STATUS)


def backend(device: Union[str, torch.device] = "cpu") -> str:
    """Which kernel pack/unpack/position_ids run on tensors of ``device``, and why."""
    kind = torch.device(device).type
    if kind == "cpu" and _STATUS["loaded"]:
        return "C++ extension (tec_fast._C" + (", OpenMP)" if _STATUS["openmp"] else ")")
    if kind == "cuda" and _STATUS["cuda"]:
        return "CUDA extension (tec_fast._C_cuda)"
    why = _STATUS["cuda_reason"] if kind == "cuda" else _STATUS["reason"]
    return f"plain-torch reference ({why or 'no compiled kernel for ' + kind})"


