"""The demo-seeds table: its rows record the commit they ran, and times round to the second;
--report-only prints the table; each run says where it is on stderr."""
from __future__ import annotations

import json
import pathlib

import pytest

from benchmarks.experiments import demo_seeds


def _results(tmp_path, seconds, seed=3):
    scores = {"knn": 0.5, "linear": 0.6}
    doc = {"seed": seed, "mode": "default", "seconds": seconds, "steps": {}, "plan": {},
           "machine": {"threads": 2, "torch": "2.13.0"}, "tec_minus_base": scores, "tec_minus_mae_continued": scores,
           **{r: scores for r in demo_seeds.ROWS}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    return str(tmp_path)


def test_rows_record_the_commit_and_round_the_time(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_seeds, "_commit", lambda: "abc1234")
    row = demo_seeds.row_of(_results(tmp_path, 444.9), "2 cores")
    assert row["commit"] == "abc1234"
    assert "| 7:25 (2 cores) |" in demo_seeds.table([row])  # 444.9 s: 7:25, not cut to 7:24


def _current_row(seed: int) -> dict:
    from tec_fast.demo.recipe import PLANS
    scores = {"knn": 0.5, "linear": 0.6}
    return {"seed": seed, "mode": "default", "seconds": 61, "note": "n", "plan": PLANS["default"].to_dict(),
            **{r: scores for r in demo_seeds.ROWS}, "tec_minus_base": scores, "tec_minus_mae_continued": scores}


def test_report_only_prints_the_table_and_writes_nothing(tmp_path, capsys):
    """--report-only without --readme prints the current plan's table (newest row per seed) from
    --results; it used to do nothing and exit 0."""
    results = tmp_path / "demo.jsonl"
    old, new = _current_row(1), dict(_current_row(1), seconds=125)
    results.write_text("".join(json.dumps(r) + "\n" for r in (old, new, _current_row(0))))
    before = results.read_text()
    assert demo_seeds.main(["--report-only", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 50.0 / 60.0" in out and "| 1:01 (n) |" in out and "| 2:05 (n) |" in out
    assert "| 1 | 50.0 / 60.0" in out and out.count("| 1 | ") == 1  # the newest row of seed 1 alone
    assert results.read_text() == before


def test_report_only_refusals_are_one_line(tmp_path, capsys):
    for argv, flag in ((["--report-only", "--results", str(tmp_path / "none.jsonl")], "--report-only"),
                       (["--report-only", "--collect", str(tmp_path)], "--collect"),  # no results.json there
                       (["--out", str(tmp_path / "demo.jsonl"), "--results", str(tmp_path)], "--results")):
        with pytest.raises(SystemExit) as info:
            demo_seeds.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith(f"error: argument {flag}: ") and err.count("\n") == 1, err


def test_each_run_says_where_it_is_on_stderr(tmp_path, capsys, monkeypatch):
    """Runs print ``[i/N] seed S ...`` as they start and ``[i/N] seed S done in T s`` as they end,
    and the train command keeps its own progress line unless --no-progress; a failed run is one
    error line and exit 1."""
    import subprocess
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        folder = pathlib.Path(cmd[cmd.index("--output") + 1])
        folder.mkdir(parents=True)
        _results(folder, 3.0, seed=int(cmd[cmd.index("--seed") + 1]))
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(demo_seeds.subprocess, "run", fake_run)
    monkeypatch.setattr(demo_seeds, "_commit", lambda: "abc1234")
    results = tmp_path / "demo.jsonl"
    assert demo_seeds.main(["--seeds", "4,5", "--out", str(tmp_path / "runs"), "--results", str(results)]) == 0
    err = capsys.readouterr().err
    assert "[1/2] seed 4: python -m tec_fast.train --seed 4" in err and "[2/2] seed 5 done in " in err
    assert all("--no-progress" not in c for c in calls)
    assert [json.loads(line)["seed"] for line in results.read_text().splitlines()] == [4, 5]

    monkeypatch.setattr(demo_seeds.subprocess, "run", lambda cmd, **k: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 3))
    assert demo_seeds.main(["--seeds", "6", "--out", str(tmp_path / "runs"), "--results", str(results),
                            "--no-progress"]) == 1
    assert "--no-progress" in calls[-1]
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: [1/1] seed 6: the train command failed (exit 3)")
