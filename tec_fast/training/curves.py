"""``DIR/curves.png``: a run's loss terms (and training accuracy, where a run logs one), learning
rate and throughput per optimizer step, drawn
from its ``metrics.jsonl``. matplotlib is optional (the ``demo`` extra): without it nothing is
drawn and the callers say so."""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Tuple

from tec_fast.training.monitor import read_jsonl

CURVES_FILE = "curves.png"
# step-record keys that are not loss terms
NOT_LOSSES = {"time", "stage", "step", "epoch", "lr", "img_per_s", "elapsed_s", "grad_norm"}

Series = Dict[str, List[Tuple[int, float]]]  # name -> [(step, value)]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """``fig`` as a PNG at ``path``, written to a temporary file beside it and renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_steps(metrics_path: str) -> Dict[str, Dict[int, dict]]:
    """Step records of a ``metrics.jsonl`` per stage: {stage: {step: record}}. A step logged twice
    (a run resumed from an earlier checkpoint) keeps its newest record; torn lines are skipped."""
    stages: Dict[str, Dict[int, dict]] = {}
    for rec in read_jsonl(metrics_path):
        if "event" not in rec and isinstance(rec.get("step"), int):
            stages.setdefault(str(rec.get("stage", "train")), {})[rec["step"]] = rec
    return stages


def _is_accuracy(key: str) -> bool:
    return "top1" in key or "acc" in key


def curves(stages: Dict[str, Dict[int, dict]]) -> Tuple[Series, Series, Series, Series]:
    """(loss terms, accuracies, lr, img/s) as series named '<stage>' or '<stage> <term>'."""
    losses: Series = {}
    accuracy: Series = {}
    lr: Series = {}
    speed: Series = {}
    for stage, steps in stages.items():
        for step in sorted(steps):
            rec = steps[step]
            for key, value in rec.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if key == "lr":
                    lr.setdefault(stage, []).append((step, value))
                elif key == "img_per_s":
                    speed.setdefault(stage, []).append((step, value))
                elif key not in NOT_LOSSES:
                    (accuracy if _is_accuracy(key) else losses).setdefault(f"{stage} {key}", []).append(
                        (step, value))
    return losses, accuracy, lr, speed


def plot_run(folder: str, path: Optional[str] = None) -> Optional[str]:
    """Draw ``folder``/metrics.jsonl into ``path`` (default ``folder``/curves.png). Returns the
    path, or None without matplotlib. ValueError when there is no metrics log or no step in it."""
    metrics = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise ValueError(f"{folder!r}: no metrics.jsonl (not the output folder of a run?)")
    losses, accuracy, lr, speed = curves(read_steps(metrics))
    if not losses:
        raise ValueError(f"{metrics}: no step records to plot yet")
    plt = pyplot()
    if plt is None:
        return None
    panels = [(losses, "loss", True)] + ([(accuracy, "training accuracy", False)] if accuracy else []) + \
        [(lr, "learning rate", False), (speed, "images / s", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 3.8))
    for ax, (series, ylabel, log_y) in zip(axes, panels):
        for name, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
        values = [v for pts in series.values() for _, v in pts]
        if log_y and values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.abspath(folder)))
    fig.tight_layout()
    try:
        return save_figure(fig, path or os.path.join(folder, CURVES_FILE))
    finally:
        plt.close(fig)
