"""Run a command so that a problem with the user's inputs (a bad file, a missing key, a full
disk, weights that are not finite) ends in one ``error:`` line and a non-zero exit, while a bug
still shows its traceback."""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence

import torch

from tec_fast.data.folder import UnreadableImage

EXIT_USER_ERROR = 2

# ValueError: the library's refusal of an input (a path, a key, a shape, a format);
# OSError: the file system's (missing file, permission, disk full).
USER_ERRORS = (ValueError, OSError, UnreadableImage)


def nonfinite_keys(state: dict) -> List[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line. An exception re-raised from a DataLoader worker
    carries the worker's traceback in its text: its last line is the message."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Original Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(lines)


def run_command(main: Callable[[Optional[Sequence[str]]], int], argv=None) -> int:
    """``main(argv)``, with user errors turned into ``error: ...`` on stderr and exit status 2."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
