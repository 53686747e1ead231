"""The demo-seeds table: its rows record the commit they ran, and times round to the second."""
from __future__ import annotations

import json

from benchmarks.experiments import demo_seeds


def _results(tmp_path, seconds):
    scores = {"knn": 0.5, "linear": 0.6}
    doc = {"seed": 3, "mode": "default", "seconds": seconds, "steps": {}, "plan": {},
           "machine": {"threads": 2, "torch": "2.13.0"}, "tec_minus_base": scores, "tec_minus_mae_continued": scores,
           **{r: scores for r in demo_seeds.ROWS}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    return str(tmp_path)


def test_rows_record_the_commit_and_round_the_time(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_seeds, "_commit", lambda: "abc1234")
    row = demo_seeds.row_of(_results(tmp_path, 444.9), "2 cores")
    assert row["commit"] == "abc1234"
    assert "| 7:25 (2 cores) |" in demo_seeds.table([row])  # 444.9 s: 7:25, not cut to 7:24
