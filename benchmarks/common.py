"""Shared benchmark helpers: timing with quantiles, peak memory, result rows, JSON-lines files.

Every benchmark appends long-format rows (one per bench x provider x shape x dtype) to
``<results-dir>/<device>.jsonl``; ``benchmarks/report.py`` turns them into the README tables.
Row keys: bench, provider, device, shape, dtype, median_ms, p20_ms, p80_ms, peak_mem_gb, torch,
triton, commit, timestamp (plus whatever the benchmark adds: speedup, gb_per_s, tflop_per_s...).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch

from tec_fast.cli.flags import Parser, makeable_dir, output_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_parser(module: str, doc: str, **kwargs) -> Parser:
    """The command line of ``python -m benchmarks.<module>``: that command in the usage line (not
    the file's name), ``doc`` as the description, and a refused value ends the run with one
    ``error: argument --FLAG: ...`` line and exit status 2 instead of the usage block."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    return Parser(prog=f"python -m benchmarks.{module}", description=doc, **kwargs)


def results_dir(text: str) -> str:
    """``--results-dir`` and the like: a folder rows can be written in, checked while parsing
    (not after the measurement): not empty, not a file, no file where a folder above it would
    have to be made, and the nearest existing folder writable."""
    makeable_dir(text)
    folder = os.path.abspath(text)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {folder!r} is not writable")
    return text


def optional_results_file(text: str) -> str:
    """``--out``: a file rows can be appended to (``output_file``: not a folder, its folder
    makeable and writable), checked while parsing, where '' means "no file" (returned as it is)."""
    return text and output_file(text)


def optional_results_dir(text: str) -> str:
    """``results_dir``, where '' means "none" (returned as it is)."""
    return text and results_dir(text)


def refuse_no_visible_patch(parser: Parser, flag: str, ratio: float, num_patches: int, what: str) -> None:
    """Refuse (one ``error: argument FLAG: ...`` line, exit 2) a mask ratio the model would refuse
    once built: it must leave at least one of ``num_patches`` patches visible
    (``tec_fast.models.masking.num_visible``)."""
    from tec_fast.models.masking import num_visible

    if num_visible(num_patches, ratio) < 1:
        parser.refuse(flag, f"{ratio:g} leaves no visible patch of the {num_patches} patches of {what} "
                            f"(int({num_patches} x (1 - {ratio:g})) = 0; the model needs at least one)")


def default_device() -> str:
    """``cuda`` where this machine has a CUDA device, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_arg(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N, refused while parsing where this machine has no such
    device (torch would otherwise end the run in a traceback at its first CUDA call)."""
    if text == "cpu":
        return text
    found = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not found:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device here")
    if found.group(1) is not None and int(found.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def progress(done: int, total: int, what: str) -> None:
    """A line on stderr as a case starts, ``[3/12] masked_gather fwd B=256 ...``: a long run says
    where it is, and stdout keeps the tables alone."""
    print(f"[{done}/{total}] {what} ...", file=sys.stderr, flush=True)


class _DropFxTracingNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("is_fx_tracing will return true")


@contextlib.contextmanager
def fx_tracing_notice_dropped() -> Iterator[None]:
    """Within the block, torch's deprecation notice about ``torch.fx`` ``is_fx_tracing`` is not
    logged: torch's own nested tensors (the ``nested`` packed-attention backend on CPU, or on a
    GPU without flash varlen) call it, so the notice says nothing about this code."""
    logger, drop = logging.getLogger("torch.fx._symbolic_trace"), _DropFxTracingNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at the null device (what C++ writes there included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def quiet_profile(**kwargs) -> Iterator["torch.profiler.profile"]:
    """``torch.profiler.profile(**kwargs)`` without the ``USDT: ... profiler_start`` /
    ``profiler_stop`` lines this torch's profiler writes to stderr on every start and stop:
    stderr is silenced while the profiler starts and stops only, so warnings and errors of the
    profiled code still show."""
    prof = torch.profiler.profile(**kwargs)
    with _stderr_silenced():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _stderr_silenced():
            prof.__exit__(None, None, None)


def device_name(device) -> str:
    """The file-name-safe device name results are filed under, e.g. ``NVIDIA_H100_80GB_HBM3``
    or ``cpu-x86_64-2c``."""
    device = torch.device(device)
    if device.type == "cuda":
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", torch.cuda.get_device_name(device))
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


ENGINE_PACKAGES = ("tec_fast", "tec_fast.kernels")
_WARNED_MIXED = []


def code_outside_checkout(repo: Optional[str] = None) -> List[str]:
    """The engine's packages this process runs from outside the checkout ``repo`` (default: the
    one this file is in), as "name (folder)". An older commit checked out in a worktree and run
    with the main checkout's editable install imports ``tec_fast`` from the worktree but
    ``tec_fast.kernels`` from where the install maps it, the main checkout's ``kernels/``: its
    rows would carry the worktree's commit for kernels it did not run. (Link the worktree's
    ``tec_fast/kernels`` to its ``kernels/`` to run its own.)"""
    import importlib.util
    repo = os.path.realpath(repo or REPO)
    found = []
    for name in ENGINE_PACKAGES:
        spec = importlib.util.find_spec(name)
        where = os.path.dirname(os.path.realpath(spec.origin)) if spec is not None and spec.origin else None
        if where is None or os.path.commonpath([where, repo]) != repo:
            found.append(f"{name} ({where})")
    return found


def git_commit() -> str:
    """Short hash of HEAD, with ``-dirty`` when the working tree has changes other than the
    result files the benchmarks append to (``benchmarks/results/``: a series of runs stays one
    commit's), and ``-mixed`` when the engine's code comes from elsewhere
    (``code_outside_checkout``: a warning says which); ``unknown`` outside a git checkout."""
    mixed = code_outside_checkout()
    if mixed and not _WARNED_MIXED:
        _WARNED_MIXED.append(True)
        print(f"warning: this checkout is {REPO}, but the process runs {', '.join(mixed)}: rows are marked "
              f"'-mixed' and left out of the README's tables", file=sys.stderr)
    return _git_commit() + ("-mixed" if mixed else "")


def _git_commit() -> str:
    try:
        run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=5, cwd=REPO)
        head = run("rev-parse", "--short", "HEAD").stdout.strip()
        if not head:
            return "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", ".",
                    ":(exclude)benchmarks/results").stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> Dict[str, Optional[str]]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_callable(fn: Callable[[], object], device, warmup: int = 3, reps: int = 20,
                  measure_memory: bool = True, cuda_graph: bool = False) -> Dict[str, Optional[float]]:
    """Median / 20th / 80th percentile milliseconds per call of ``fn`` and its peak memory.

    CUDA: ``triton.testing.do_bench`` (CUDA-event timing, L2 flushed between calls) with
    ``warmup``/``reps`` read as counts of calls; peak memory is the most allocated during one
    extra call, above what was allocated before it (GB = 2**30 bytes). With ``cuda_graph`` the
    call is recorded into a CUDA graph first and the replays are timed (GPU time only; no peak
    memory). CPU: ``time.perf_counter`` around each call; no peak memory (None).
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"time_callable: needs reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    device = torch.device(device)
    sync = _sync(device)
    peak = None
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"time_callable: cuda_graph needs a CUDA device, got {device}")
    if device.type == "cuda":
        import triton.testing
        fn()  # compile / autotune outside the measurement
        sync()
        if cuda_graph:  # the replay times the GPU work alone, without the host's launch time
            from tec_fast.training.cuda_graph import capture_step
            fn, measure_memory = capture_step(fn, warmup=2), False
            fn()
            sync()
        if measure_memory:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            sync()
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        est_ms = max(1e-3, triton.testing.do_bench(fn, warmup=1, rep=1, return_mode="median"))
        q = triton.testing.do_bench(fn, warmup=max(1.0, warmup * est_ms), rep=max(1.0, reps * est_ms),
                                    quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "peak_mem_gb": peak}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": pick(0.5), "p20_ms": pick(0.2), "p80_ms": pick(0.8), "peak_mem_gb": peak}


@functools.lru_cache(maxsize=1)
def cpu_model() -> Optional[str]:
    """The host CPU's model name (/proc/cpuinfo; ``platform.processor()`` elsewhere), None where
    unknown: rows of one device name ('cpu-x86_64-2c') come from machines whose per-op ratios differ."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def complete_row(row: Dict, device) -> Dict:
    """Fill in the keys every row carries (device, versions, commit, timestamp, the host's CPU
    model) where missing."""
    full = {"device": device_name(device), **versions(), "commit": git_commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_model": cpu_model()}
    full.update({k: v for k, v in row.items() if v is not None or k not in full})
    return full


def provider_failed(failures: List[str], what: str, exc: Exception) -> None:
    """Note a provider that raised (printed now, listed in ``failures`` for ``exit_if_failed``):
    on a lent GPU one broken provider must not cost the rows of the rest."""
    failures.append(f"{what}: {type(exc).__name__}: {exc}")
    print(f"{what}: FAILED ({type(exc).__name__}: {exc})")


def exit_if_failed(failures: List[str]) -> None:
    """After the rows of the rest were written: exit non-zero naming what failed, if anything did."""
    if failures:
        raise SystemExit("failed (the rows of the rest were written):\n  " + "\n  ".join(failures))


def append_results(rows: Iterable[Dict], results_dir: str, device) -> str:
    """Append ``rows`` (completed with ``complete_row``) to ``<results_dir>/<device>.jsonl``;
    returns the file's path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{device_name(device)}.jsonl")
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(complete_row(row, device)) + "\n")
    return path


def append_jsonl(rows: Iterable[Dict], path: str) -> str:
    """Append ``rows`` as JSON lines to the file ``path`` (rows already complete); returns it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def format_table(rows: List[Dict], columns: List[str]) -> str:
    """Plain-text table of ``rows`` (floats to 4 significant digits; None as '-')."""
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
