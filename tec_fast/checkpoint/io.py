"""Reading checkpoint files safely and writing them atomically."""
from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from typing import Union

import torch

PathOrState = Union[str, os.PathLike, dict]


def read_checkpoint(src: PathOrState) -> dict:
    """A checkpoint as a dict. Paths load with ``weights_only=True`` first; official TEC/MAE
    training checkpoints pickle an argparse Namespace and need ``weights_only=False``, which is
    only tried after a warning (it can run code from the file: load files you trust)."""
    if isinstance(src, dict):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise ValueError(f"checkpoint must be a path or a dict, got {type(src).__name__}")
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on a file that is not a checkpoint
        if not (isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc)):
            raise ValueError(f"{path!r} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
        warnings.warn(f"{path}: not loadable with weights_only=True (it pickles Python objects, "
                      f"e.g. an argparse Namespace); loading with weights_only=False", stacklevel=3)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def save_atomic(obj, path: Union[str, os.PathLike]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``: a
    crash leaves either the old file or the new one, never a torn one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
