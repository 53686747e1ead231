"""``results.png``: accuracy per row (k-NN and linear probe) and the loss curve of each training
stage. matplotlib is optional (the ``demo`` extra); without it the demo says how to get the plot."""
from __future__ import annotations

from typing import Dict, List, Optional

from tec_fast.training.curves import pyplot, save_figure


def write_plot(path: str, rows: Dict[str, Dict[str, float]], curves: Dict[str, List[float]],
               title: str) -> Optional[str]:
    """Write the figure to ``path``; returns None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    names = list(rows)
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for i, (metric, label) in enumerate((("knn", "k-NN"), ("linear", "linear probe"))):
        values = [100 * rows[n][metric] for n in names]
        bars = acc.bar([x + (i - 0.5) * width for x in range(len(names))], values, width, label=label)
        acc.bar_label(bars, fmt="%.1f", fontsize=7)
    acc.set_xticks(range(len(names)), names, rotation=20)
    acc.set_ylabel("test accuracy %")
    acc.set_ylim(0, 118)  # headroom: the legend sits above the bars
    acc.legend(loc="upper center", ncol=2)
    acc.set_title("frozen features")
    for name, values in curves.items():
        if values:
            loss.plot(range(1, len(values) + 1), values, label=name)
    loss.set_xlabel("optimizer step")
    loss.set_ylabel("training loss")
    loss.set_yscale("log")
    loss.legend()
    loss.set_title("training stages")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return save_figure(fig, path)  # atomically
    finally:
        plt.close(fig)
