"""Run a command so that a problem with the user's inputs (a bad file, a missing key, a full
disk, weights that are not finite) ends in one ``error:`` line and a non-zero exit, while a bug
still shows its traceback."""
from __future__ import annotations

import signal
import sys
import warnings
from typing import Callable, Optional, Sequence

from tec_fast.data.folder import UnreadableImage

EXIT_USER_ERROR = 2

# ValueError: the library's refusal of an input (a path, a key, a shape, a format);
# OSError: the file system's (missing file, permission, disk full).
USER_ERRORS = (ValueError, OSError, UnreadableImage)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line. An exception re-raised from a DataLoader worker
    carries the worker's traceback in its text: its last line is the message."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Original Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(lines)


def kernel_mode_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is the kernel dispatch's refusal of the environment's TEC_FAST_KERNELS
    setting (``triton`` where a kernel cannot run: no GPU, no TRITON_INTERPRET): a RuntimeError
    about the user's setting, not a bug."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("TEC_FAST_KERNELS=")


def run_command(main: Callable[[Optional[Sequence[str]]], int], argv=None, on_interrupt: str = "") -> int:
    """``main(argv)``, with user errors turned into ``error: ...`` on stderr and exit status 2,
    and a Ctrl-C that reaches it (one the command does not handle itself, as training's second)
    into one line (``on_interrupt``: what the user should know about the files) and 130.
    Warnings print as ``warning: <message>`` lines meanwhile."""
    shown = warnings.formatwarning
    warnings.formatwarning = _warning_line
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): stopped at once" + (f"; {on_interrupt}" if on_interrupt else ""),
              file=sys.stderr)
        return 128 + signal.SIGINT
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as exc:
        if not kernel_mode_refusal(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        warnings.formatwarning = shown


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as a command prints it: ``warning: <message>``, without the file, line and
    source text of the code that raised it (Python's default format, meant for developers)."""
    return f"warning: {message}\n"
