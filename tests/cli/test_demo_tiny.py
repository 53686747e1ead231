"""The embedded demo, reduced (``--demo-tiny``: 20 TEC steps and the FLOP-matched MAE-continued
steps, on 512 training / 200 test images), end to end from a given base: the stages run, the
numbers depend only on the seed (fixed step counts), results.json and results.png are written."""
from __future__ import annotations

import json

import pytest
import torch

from tec_fast.demo.recipe import BASE_RECIPE
from tec_fast.demo.shipped_base import new_mae, save_base


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base the way --demo-make-base writes one (untrained weights: the pipeline is tested here,
    the shipped base in test_demo_base.py)."""
    folder = tmp_path_factory.mktemp("demo_base")
    torch.manual_seed(0)
    save_base(new_mae(), {"recipe": BASE_RECIPE.to_dict(), "eval": {"knn": 0.1, "linear": 0.1}}, str(folder))
    return str(folder)


def _run(out, base_dir, seed=0):
    from tec_fast.cli.train import main

    n = torch.get_num_threads()
    try:
        assert main(["--demo-tiny", "--demo-base", base_dir, "--output", str(out), "--no-progress",
                     "--seed", str(seed)]) == 0
    finally:
        torch.set_num_threads(n)
    return json.loads((out / "results.json").read_text())


def test_demo_tiny_is_fixed_by_its_seed(tmp_path, base_dir, capsys, monkeypatch):
    import tec_fast.demo.run as demo

    monkeypatch.setattr(demo, "stage_layout", lambda: (2, 1))  # the stages side by side, 1 thread each
    doc = _run(tmp_path / "a", base_dir)
    assert doc["machine"]["stage_processes"] == 2 and doc["machine"]["threads"] == 1
    for row in ("pixels", "random_init", "base", "mae_continued", "tec"):
        assert set(doc[row]) == {"knn", "linear"}, row
        assert all(0.0 <= doc[row][m] <= 1.0 for m in ("knn", "linear")), row
    for key in ("tec_minus_base", "tec_minus_mae_continued", "compute_match", "steps", "plan", "seed", "mode"):
        assert key in doc, key
    assert doc["mode"] == "tiny" and doc["steps"]["tec"] == 20
    match = doc["compute_match"]
    assert doc["steps"]["mae_continued"] == match["mae_steps"]
    assert abs(match["mae_steps"] * match["mae_step_flops"] - match["tec_flops"]) <= match["mae_step_flops"]
    assert doc["tec_minus_base"]["knn"] == pytest.approx(doc["tec"]["knn"] - doc["base"]["knn"])
    assert doc["pixels"]["knn"] > 0.3  # digits are visible in raw pixels: the data is real
    assert (tmp_path / "a" / "results.png").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "what the row is" in text and "mae_continued" in text and "results.png" in text
    monkeypatch.setattr(demo, "stage_layout", lambda: (1, 1))  # now one after the other in this process
    again = _run(tmp_path / "b", base_dir)
    assert again["machine"]["stage_processes"] == 1
    for row in ("tec", "mae_continued", "base", "random_init"):
        assert again[row] == doc[row], row  # same seed and thread count: the same numbers, however run
    assert again["losses"] == doc["losses"]


def test_stage_progress_line_reads_both_stage_logs(tmp_path, capsys):
    """The side-by-side stages report through their metrics logs; one line shows both (a line
    still being written is skipped; a log an earlier run left in the folder counts from this run's start)."""
    from tec_fast.demo.run import _StageProgress, stage_layout

    for stage, lines in (("tec", ['{"event": "start", "step": 0}\n', '{"step": 90}\n', '{"event": "start", "step": 0}\n',
                                     '{"step": 10}\n', '{"step": 30}\n', '{"step": 4']),
                         ("mae_continued", ['{"event": "start", "step": 0}\n'])):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(lines))
    _StageProgress(str(tmp_path), {"tec": 100, "mae_continued": 50, "missing": 10}, True).update(final=True)
    line = capsys.readouterr().err
    assert "[tec] 30/100" in line and "[mae_continued] 0/50" in line and "[missing] 0/10" in line
    assert " 19%" in line and "ETA" in line
    processes, threads = stage_layout()
    assert processes in (1, 2) and threads >= 1
