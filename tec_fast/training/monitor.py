"""What a run shows: a progress line for people, JSON lines (and optionally TensorBoard) for
machines, and a closing table. Only rank 0 builds these."""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def write_status_line(stream, line: str, tty: bool, final: bool = False) -> None:
    """A progress line: redrawn in place on a terminal (newline only when ``final``), one plain
    line each time elsewhere (log files, CI)."""
    stream.write(("\r" + line + "\x1b[K" + ("\n" if final else "")) if tty else line + "\n")
    stream.flush()


class Progress:
    """One progress line: step, bar, img/s, loss, lr, ETA. On a terminal it redraws in place
    (at most ~4 times a second); elsewhere (log files, CI) it prints a plain line every
    ``every`` steps and at the end."""

    def __init__(self, name: str, total_steps: int, start_step: int = 0, every: int = 10,
                 stream=None, enabled: bool = True):
        self.name, self.total, self.every, self.enabled = name, total_steps, max(1, every), enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start_step, self.t0, self._last_draw = start_step, time.perf_counter(), 0.0
        self._open_line = False  # a terminal line drawn without its newline yet

    def update(self, step: int, epoch: int, img_per_s: float, metrics: Dict[str, float], lr: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        last = step >= self.total
        if self.tty:
            if not last and now - self._last_draw < 0.25:
                return
        elif not (last or step % self.every == 0 or step == self.start_step + 1):
            return
        self._last_draw = now
        done = step - self.start_step
        rate = done / (now - self.t0) if now > self.t0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        frac = step / self.total if self.total else 1.0
        parts = [f"[{self.name}] {step}/{self.total}"]
        if self.tty:
            filled = int(20 * frac)
            parts.append("|" + "#" * filled + "." * (20 - filled) + "|")
        parts.append(f"{100 * frac:3.0f}%  ep {epoch}  {img_per_s:7.1f} img/s")
        parts += [f"{k} {v:.4f}" for k, v in metrics.items()]
        parts.append(f"lr {lr:.2e}  ETA {format_duration(eta)}")
        write_status_line(self.stream, "  ".join(parts), self.tty, final=last)
        self._open_line = self.tty and not last

    def close(self) -> None:
        if self._open_line:
            self._open_line = False
            self.stream.write("\n")
            self.stream.flush()


def read_jsonl(path: str) -> Iterator[dict]:
    """The JSON objects of a JSON-lines file (``metrics.jsonl``, benchmark results) in order. Lines
    that are not a whole JSON object are skipped: a blank line, a line another process is still
    writing (no newline yet), a line torn by a crash."""
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


class MetricsLog:
    """Appends one JSON object per line to ``path`` (``metrics.jsonl``) and each step record as a
    row of ``metrics.csv`` beside it; mirrors scalars to TensorBoard when asked for and
    ``torch.utils.tensorboard`` imports, and to Weights & Biases with ``wandb_project``
    (``WANDB_MODE=offline`` works without an account; the run id is kept in ``wandb-run-id`` so
    a resumed run logs into the same wandb run)."""

    def __init__(self, path: Optional[str], tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, run_config: Optional[dict] = None):
        self.path = path
        self._file = None
        self._csv = CsvLog(os.path.splitext(path)[0] + ".csv") if path else None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = _open_for_append(path)
        self._tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(tensorboard_dir)
            except Exception as exc:  # tensorboard not installed
                warnings.warn(f"--tensorboard: TensorBoard is not available ({exc}); "
                              f"metrics go to {path} only", RuntimeWarning)
        self._wandb = _start_wandb(wandb_project, os.path.dirname(os.path.abspath(path)) if path else None,
                                   run_config) if wandb_project else None

    def write(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        if self._file is not None:
            self._file.write(json.dumps(_finite_or_null(record), default=_jsonable, allow_nan=False) + "\n")
        if "step" not in record:
            return
        stage = record.get("stage", "train")
        scalars = {k: v for k, v in record.items() if k not in ("step", "epoch", "time")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{stage}/{key}", value, record["step"])
        if "event" in record:  # start, checkpoint, end: in metrics.jsonl, not among the step rows
            return
        if self._csv is not None:
            self._csv.write(record)
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in scalars.items()}, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class CsvLog:
    """Step records as CSV rows. The columns are the first record's (those of a file being
    appended to are read from its header); a key not among them is left out of the CSV (it is
    in ``metrics.jsonl``), a missing one is an empty cell."""

    def __init__(self, path: str):
        self.path, self._file, self._writer = path, None, None

    def write(self, record: dict) -> None:
        import csv

        if self._writer is None:
            fields = None
            if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
                with open(self.path, newline="") as f:
                    fields = next(csv.reader(f), None)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = _open_for_append(self.path, newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=fields or list(record),
                                          extrasaction="ignore", restval="")
            if not fields:
                self._writer.writeheader()
        self._writer.writerow(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._writer = None, None


def _open_for_append(path: str, **kwargs):
    """``path`` opened to append lines (line-buffered). A last line left without its newline (a
    run killed mid-write, a full disk) is ended first: the next record starts a line of its own
    instead of joining the torn one, which readers skip (``read_jsonl``)."""
    f = open(path, "a", buffering=1, **kwargs)
    if f.tell() > 0:
        with open(path, "rb") as tail:
            tail.seek(-1, os.SEEK_END)
            if tail.read(1) != b"\n":
                f.write("\n")
    return f


WANDB_ID_FILE = "wandb-run-id"


def _start_wandb(project: str, folder: Optional[str], run_config: Optional[dict]):
    """A wandb run in ``project`` (its files under ``folder``/wandb), continuing the folder's
    previous one when its id is on record. ValueError when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"--wandb {project}: wandb is not installed (pip install wandb), or leave "
                         f"--wandb out") from None
    run_id = None
    id_file = os.path.join(folder, WANDB_ID_FILE) if folder else None
    if id_file and os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip() or None
    kwargs = {"dir": folder} if folder else {}
    run = wandb.init(project=project, config=run_config or {}, id=run_id, resume="allow" if run_id else None,
                     name=os.path.basename(os.path.abspath(folder)) if folder else None, **kwargs)
    if id_file and run_id is None and getattr(run, "id", None):
        with open(id_file, "w") as f:
            f.write(str(run.id) + "\n")
    return run


def _finite_or_null(value):
    """``value`` with every NaN / inf float (in dicts and lists too) as None: strict JSON (null),
    which every parser reads; Python's json would write NaN, which strict parsers refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _jsonable(obj):
    if hasattr(obj, "tolist"):  # tensors, NumPy arrays and scalars
        return _finite_or_null(obj.tolist())
    return str(obj)


def table(headers: Sequence[str], rows: Iterable[Sequence], title: Optional[str] = None,
          align: Optional[str] = None) -> str:
    """A plain-text table. ``align``: one 'l' or 'r' per column (default: first column left,
    the others right). Headers all empty: no heading row."""
    rows = [[str(c) for c in r] for r in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def fmt(cells: List[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    lines = [title] if title else []
    if any(str(h) for h in headers):  # a key-value table passes empty headers: no heading row
        lines.append(fmt([str(h) for h in headers]))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


class StepMeter:
    """Per-step bookkeeping of a run: the losses, the progress line, and a metrics-log record
    every ``log_every`` steps holding the means since the previous record."""

    def __init__(self, name: str, log: MetricsLog, progress: Progress, log_every: int, total_steps: int):
        self.name, self.log, self.progress = name, log, progress
        self.log_every, self.total_steps = log_every, total_steps
        self.losses: List[float] = []
        self.metrics: Dict[str, float] = {}
        self.t0 = self.t_log = time.perf_counter()
        self.window: Dict[str, float] = {}
        self.steps_since_log = self.images_since_log = self.images = 0

    def record(self, step: int, epoch: int, metrics: Dict[str, float], images: int, lr: float,
               elapsed_s: float) -> None:
        self.metrics = metrics
        self.losses.append(metrics["loss"])
        for k, v in metrics.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.steps_since_log += 1
        self.images_since_log += images
        self.images += images
        now = time.perf_counter()
        img_s = self.images_since_log / max(now - self.t_log, 1e-9)
        self.progress.update(step, epoch, img_s, {k: v for k, v in metrics.items() if k != "grad_norm"}, lr)
        if step % self.log_every == 0 or step == self.total_steps:
            self.log.write({"stage": self.name, "step": step, "epoch": epoch, "lr": lr,
                            **{k: v / self.steps_since_log for k, v in self.window.items()},
                            "img_per_s": img_s, "elapsed_s": elapsed_s})
            self.t_log, self.steps_since_log, self.images_since_log, self.window = now, 0, 0, {}

    @property
    def img_per_s(self) -> float:
        """Images per second over every step recorded."""
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    def close(self) -> None:
        self.progress.close()
        self.log.close()
