"""Flag types that refuse bad values at parse time, and a parser whose refusals are one line.

A value that is out of range, non-finite or not a number ends the command with
``error: argument --FLAG: ...`` and exit status 2; nothing falls back to a default.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Optional


class Parser(argparse.ArgumentParser):
    """argparse, but a refused command line prints one ``error:`` line instead of the usage
    block (the train command's usage is twenty lines long and hides the message)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def refuse(self, flag: str, why: str):
        """A value that passed its type but contradicts another flag or the file system."""
        self.error(f"argument {flag}: {why}")


def integer(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """An int in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_range(lo, hi)}, got {text}")
        return value
    parse.__name__ = "integer"
    return parse


def real(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
         hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval (open or closed at each end)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            raise argparse.ArgumentTypeError(f"must be {_range(lo, hi, lo_open, hi_open)}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
SEED = integer(0, 2 ** 63 - 1)


def mask_ratio(text: str):
    """'0.75' -> 0.75; '0.6:0.9' -> (0.6, 0.9). Every ratio in (0, 1): at 0 no patch is hidden and
    the reconstruction loss has nothing to average; at 1 the encoder sees nothing."""
    try:
        parts = [float(v) for v in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio like 0.75 or a range like 0.6:0.9, got {text!r}") from None
    if len(parts) > 2 or not all(0.0 < v < 1.0 for v in parts) or (len(parts) == 2 and parts[0] > parts[1]):
        raise argparse.ArgumentTypeError(f"mask ratios must be in (0, 1) and LO <= HI, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def device(text: str) -> str:
    """A torch device that exists here: cpu, or cuda[:N] with CUDA and N < the device count."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine "
                                             f"(torch {torch.__version__}, cuda {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} "
                                             f"CUDA device(s)")
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        what = "a folder" if os.path.isdir(text) else "no such file"
        raise argparse.ArgumentTypeError(f"{text!r}: {what}")
    return text


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        what = "a file, not a folder" if os.path.exists(text) else "no such folder"
        raise argparse.ArgumentTypeError(f"{text!r}: {what}")
    return text


def data_source(text: str) -> str:
    """--data: an image folder, a Hugging Face dataset folder, a .tar shard, or a shard pattern
    (``shards-{0000..0099}.tar``) whose files all exist."""
    from tec_fast.data.sources import data_kind
    from tec_fast.data.shards import shard_paths

    try:
        if data_kind(text) == "shards":
            shard_paths(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def output_file(text: str) -> str:
    """A path a file can be written to: not a folder, its folder not a file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got an empty string")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    parent = _nearest_folder(text)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {parent!r} is not writable")
    return text


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (through links too); False where either
    does not exist yet and their resolved paths differ."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def output_dir(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got an empty string")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return text


def makeable_dir(text: str) -> str:
    """``output_dir``, and no file where a folder above it would have to be made."""
    output_dir(text)
    _nearest_folder(text)
    return text


def _nearest_folder(text: str) -> str:
    """The nearest existing folder above the path ``text``; ArgumentTypeError where the nearest
    existing path above it is a file."""
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r}: {parent!r} is a file, not a folder")
    return parent


def given(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Option strings of the flags whose value differs from their default (what the user set)."""
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and \
                getattr(args, action.dest, action.default) != action.default:
            yield action.dest, action.option_strings[0]

