"""The embedded demo, reduced (``--demo-tiny``: 40 MAE + 30 TEC steps on a subset; ~1 min on
2 idle cores), end to end: stages run, results.json has the documented schema."""
from __future__ import annotations

import json
import os

import torch


def test_demo_tiny_writes_results(tmp_path, capsys):
    from tec_fast.cli.train import main

    n = torch.get_num_threads()
    try:
        assert main(["--demo-tiny", "--output", str(tmp_path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    doc = json.loads((tmp_path / "results.json").read_text())
    for row in ("pixels", "random_init", "base", "tec"):
        assert set(doc[row]) == {"knn", "linear"}, row
        assert all(0.0 <= doc[row][m] <= 1.0 for m in ("knn", "linear")), row
    for key in ("config", "timings", "seed", "steps", "tec_beat_base", "tec_minus_base", "rows", "mode"):
        assert key in doc, key
    assert doc["mode"] == "tiny" and doc["seed"] == 0
    assert doc["steps"]["stage1_mae"]["done"] == 40 and doc["steps"]["stage2_tec"]["done"] == 30
    assert doc["pixels"]["knn"] > 0.3  # digits are visible in raw pixels: the data is real
    text = capsys.readouterr().out
    assert "what the row is" in text and ("beat its base" in text)
    for f in ("base_encoder", "tec_encoder_timm", "stage1_checkpoint", "stage2_checkpoint"):
        assert os.path.isfile(doc["files"][f]), f
