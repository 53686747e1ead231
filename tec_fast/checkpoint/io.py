"""Reading checkpoint files safely and writing them atomically.

Formats read: PyTorch files (``torch.save``; unpickled with ``weights_only=True``), safetensors
files, and Hugging Face ``save_pretrained`` folders (``config.json`` beside ``model.safetensors``,
``pytorch_model.bin`` or a sharded ``*.index.json``). Safetensors files are read (memory-mapped)
and written through the ``safetensors`` package; only the sniffing of a file's format (its first
nine bytes) is done here.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import re
import struct
import tempfile
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

PathOrState = Union[str, os.PathLike, dict]

# The one class official TEC/MAE training checkpoints pickle beside their tensors (``args``).
SAFE_GLOBALS = [argparse.Namespace]
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".pth"
# What a killed save leaves: tempfile.mkstemp names (the prefix, 8 characters of [a-z0-9_], the
# suffix: ``save_atomic``'s, or config.yaml's from ``write_text_atomic``), and the hard link that
# ``CheckpointManager`` renames over checkpoint-last (``.link-PID.pth``).
_TEMP_NAME = re.compile(r"^(?:" + re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}(?:" + re.escape(TEMP_SUFFIX)
                        + r"|config\.yaml)|\.link-[0-9]+\.pth)$")

# the first bytes of a zip archive: every torch.save file since PyTorch 1.6
_ZIP_MAGIC = b"PK\x03\x04"

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def read_checkpoint(src: PathOrState, trust: bool = False) -> dict:
    """A checkpoint as a dict: a dict is returned as is; a file or folder is read.

    PyTorch files load with ``weights_only=True``, allowing exactly ``argparse.Namespace`` (what
    official TEC/MAE training checkpoints pickle as ``args``). Anything else pickled is refused
    unless ``trust=True`` (full unpickling: it can run code from the file). A Hugging Face folder
    reads as ``{'model': state_dict, 'hf_config': config.json}``; a safetensors file as
    ``{'model': state_dict, 'metadata': ...}``.
    """
    if isinstance(src, dict):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise ValueError(f"checkpoint must be a path or a dict, got {type(src).__name__}")
    path = os.fspath(src)
    if os.path.isdir(path):
        return _read_hf_folder(path, trust)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist or is not a file")
    if _looks_like_safetensors(path):
        state, metadata = read_safetensors(path)
        return {"model": state, "metadata": metadata}
    obj = _torch_load(path, trust)
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _torch_load(path: str, trust: bool):
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on a file that is not a checkpoint
        unsupported = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(exc), re.IGNORECASE)
        if unsupported is None:
            raise _load_failure(path, exc) from None
        if not trust:
            raise ValueError(
                f"{path!r} pickles a Python object that safe loading refuses ({unsupported.group(1)}); "
                f"only argparse.Namespace is allowed. If you trust the file, load it with trust=True "
                f"(CLI: --trust-checkpoint), which unpickles it fully and can run code from it") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _load_failure(path, exc) from None


def _load_failure(path: str, exc: Exception) -> ValueError:
    """The error for a file ``torch.load`` could not read. A file that starts as a zip archive
    (what ``torch.save`` writes) but does not load is a cut-short or damaged checkpoint: it says
    so with the file's size. torch's own text follows up to its first sentence only (the rest
    is advice about what corrupts files); an UnpicklingError's text (advice on weights_only)
    is left out."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    first = first.split(". ", 1)[0].rstrip(".") if not isinstance(exc, pickle.UnpicklingError) else ""
    why = type(exc).__name__ + (f": {first}" if first else "")
    with open(path, "rb") as f:
        zipped = f.read(4) == _ZIP_MAGIC
    if zipped:
        return ValueError(f"{path!r}: truncated or corrupt PyTorch checkpoint ({os.path.getsize(path)} bytes; "
                          f"{why})")
    return ValueError(f"{path!r} is not a PyTorch checkpoint ({why})")


# ------------------------------------------------------------------------------ safetensors
def _looks_like_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 2 <= n <= os.path.getsize(path) - 8


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of a safetensors file, through the ``safetensors`` package: the file is
    memory-mapped and each tensor's pages are read when it is used, not copied up front."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            return {name: f.get_tensor(name) for name in f.keys()}, dict(metadata)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:  # a header or offsets it refuses
        raise ValueError(f"{path!r} is not a readable safetensors file ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None


def write_safetensors(state: Dict[str, torch.Tensor], path: Union[str, os.PathLike],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """A safetensors file (atomically, through ``safetensors.torch.save``); metadata defaults to
    {'format': 'pt'}, which transformers requires. Tensors that share storage (views such as
    the q/k/v thirds of one qkv weight) are written as copies: the format holds no aliases."""
    tensors, storages = {}, set()
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"safetensors holds tensors only; {name!r} is a {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        key = t.untyped_storage().data_ptr()
        if t.numel() and (key in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    meta = {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}
    try:
        blob = safetensors_save(tensors, metadata=meta)
    except (SafetensorError, ValueError, TypeError) as exc:  # e.g. a dtype the format has no name for
        raise ValueError(f"cannot write {os.fspath(path)!r} as safetensors: {exc}") from None
    _write_atomic(path, lambda f: f.write(blob))


# -------------------------------------------------------------------- Hugging Face folders
def _read_hf_folder(path: str, trust: bool) -> dict:
    present = [f for f in _HF_WEIGHTS if os.path.isfile(os.path.join(path, f))]
    if not present:
        raise ValueError(f"folder {path!r} holds none of {', '.join(_HF_WEIGHTS)} (a Hugging Face "
                         f"save_pretrained folder); found {sorted(os.listdir(path))[:10]}")
    weights = os.path.join(path, present[0])
    if weights.endswith(".index.json"):
        with open(weights) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(_state_of(read_checkpoint(os.path.join(path, name), trust)))
    else:
        state = _state_of(read_checkpoint(weights, trust))
    config = {}
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    return {"model": state, "hf_config": config}


def _state_of(obj: dict) -> dict:
    return obj["model"] if isinstance(obj.get("model"), dict) else obj


# ------------------------------------------------------------------------------- writing
class _DiskWriter:
    """A file that remembers the OSError of a failed write: torch.save reports a full disk as
    ``unexpected pos``; with this, the caller can say what happened."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        try:
            self.f.flush()
        except OSError as exc:
            self.error = exc
            raise


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``os.umask`` sets
    as it reads, which another thread could see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_temp(folder: str):
    """A temporary file beside the target. ``mkstemp`` creates it 0600; it gets the mode the
    umask gives any file the user creates (0644 under umask 022), so a teammate on a shared
    cluster can read the checkpoint the rename publishes."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except OSError:  # a file system without modes (some network mounts): keep mkstemp's
        pass
    return tmp, os.fdopen(fd, "wb")


def _write_atomic(path: Union[str, os.PathLike], write) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp, f = _open_temp(folder)
    writer = _DiskWriter(f)
    try:
        with f:
            write(writer)
            writer.flush()
            try:
                os.fsync(f.fileno())
            except OSError as exc:
                writer.error = exc
                raise
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        err = writer.error or (exc if isinstance(exc, OSError) else None)
        if err is not None and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err.errno, f"no space left on the device to write {path} "
                                     f"({os.strerror(err.errno)}); nothing was replaced") from None
        if err is not None and not isinstance(exc, OSError):
            raise OSError(err.errno, f"could not write {path}: {err}") from exc
        raise


def save_atomic(obj, path: Union[str, os.PathLike]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``: a
    crash leaves either the old file or the new one, never a torn one (and maybe a temporary
    ``.tmp-XXXXXXXX.pth`` that ``clean_stale_temp_files`` removes). A full disk raises an OSError
    (errno ENOSPC) naming ``path``."""
    _write_atomic(path, lambda f: torch.save(obj, f))


def clean_stale_temp_files(folder: Union[str, os.PathLike],
                           say: Optional[Callable[[str], object]] = None) -> List[str]:
    """Remove the temporary files of saves that were killed in ``folder`` (only the names the
    saves make, ``.tmp-XXXXXXXX.pth``, ``.tmp-XXXXXXXXconfig.yaml``, ``.link-PID.pth``, and only
    regular files); returns their paths, and tells ``say`` (a command's printer) when there were
    any. Call it before this process saves anything there."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if _TEMP_NAME.match(name) and os.path.isfile(full) and not os.path.islink(full):
            os.unlink(full)
            removed.append(full)
    if removed and say is not None:
        say(f"removed {len(removed)} temporary file(s) left by an interrupted save in {folder}: "
            f"{', '.join(os.path.basename(f) for f in removed)}")
    return removed
