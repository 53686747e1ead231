"""What a run leaves to watch it by: metrics.csv beside metrics.jsonl, wandb (a stand-in module
here; the real one offline when installed), curves.png, and config.yaml that reruns the run."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from conftest import write_class_folders

from tec_fast.training.curves import plot_run, read_steps
from tec_fast.training.monitor import MetricsLog

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def _steps(log: MetricsLog, first: int, last: int, stage: str = "tec"):
    for s in range(first, last + 1):
        log.write({"stage": stage, "step": s, "epoch": 0, "lr": 1e-3 * s, "loss": 1.0 / s, "feature": 0.5 / s,
                   "img_per_s": 100.0 + s, "elapsed_s": float(s)})


def test_csv_holds_the_step_records_and_appends_under_its_header(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(str(path))
    log.write({"event": "start", "stage": "tec", "step": 0, "config": {"a": 1}})
    _steps(log, 1, 3)
    log.write({"event": "end", "stage": "tec", "step": 3, "seconds": 1.0})
    log.close()
    log = MetricsLog(str(path))  # a resumed run appends
    log.write({"stage": "tec", "step": 4, "epoch": 1, "lr": 0.004, "loss": 0.25, "new_term": 7.0})
    log.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == ["time", "stage", "step", "epoch", "lr", "loss", "feature", "img_per_s", "elapsed_s"]
    assert float(rows[1]["loss"]) == 0.5 and rows[3]["feature"] == "" and "new_term" not in rows[3]
    assert len(path.read_text().splitlines()) == 6  # every record stays in the JSON lines


def test_metrics_jsonl_is_strict_json_with_non_finite_values(tmp_path):
    """A NaN / inf loss (the record of a run stopped by one) is written as null: strict JSON
    parsers (JavaScript's, Go's) refuse Python's NaN."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(str(path))
    log.write({"event": "nonfinite_loss", "stage": "tec", "step": 5, "loss": float("nan"),
               "terms": {"feature": float("inf"), "relation": 0.5}, "grad": torch.tensor([1.0, float("-inf")]),
               "scale": np.float32("nan")})
    log.close()

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    record = json.loads(path.read_text(), parse_constant=refuse)
    assert record["loss"] is None and record["terms"] == {"feature": None, "relation": 0.5}
    assert record["grad"] == [1.0, None] and record["scale"] is None


class _FakeRun:
    def __init__(self, kwargs):
        self.kwargs, self.logged, self.finished, self.id = kwargs, [], False, kwargs.get("id") or "run123"

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_wandb_gets_the_step_records_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(_FakeRun(kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, wandb_project="proj", run_config={"seed": 3})
    log.write({"event": "start", "stage": "tec", "step": 0})
    _steps(log, 1, 2)
    log.close()
    run = runs[0]
    assert run.kwargs["project"] == "proj" and run.kwargs["config"] == {"seed": 3}
    assert run.kwargs["id"] is None and run.kwargs["dir"] == str(tmp_path) and run.finished
    assert [s for s, _ in run.logged] == [1, 2]  # the step records, not the events
    assert run.logged[0][1]["tec/loss"] == 1.0 and "tec/step" not in run.logged[0][1]
    assert (tmp_path / "wandb-run-id").read_text().strip() == "run123"
    MetricsLog(path, wandb_project="proj").close()
    assert runs[1].kwargs["id"] == "run123" and runs[1].kwargs["resume"] == "allow"


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_real_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), wandb_project="tec-fast-test")
    _steps(log, 1, 2)
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed")
def test_wandb_flag_without_wandb_is_one_error_line(tmp_path, capsys):
    from tec_fast.cli.train import main
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path / "d"), "--objective", "mae", "--wandb", "proj"])
    assert exc.value.code == 2
    assert "error: argument --wandb: wandb is not installed (pip install wandb)" in capsys.readouterr().err


def test_read_steps_keeps_the_newest_record_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(str(path))
    _steps(log, 1, 4)
    log.write({"stage": "tec", "step": 3, "loss": 9.0})  # re-logged after a resume from step 2
    log.close()
    with open(path, "a") as f:
        f.write('{"stage": "tec", "step": 5, "lo')  # a torn last line
    steps = read_steps(str(path))["tec"]
    assert sorted(steps) == [1, 2, 3, 4] and steps[3]["loss"] == 9.0


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plot_written_and_eval_plot_command(tmp_path, capsys):
    from tec_fast.cli.eval import cli
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    _steps(log, 1, 30)
    _steps(log, 1, 30, stage="mae")
    log.close()
    assert plot_run(str(tmp_path)) == str(tmp_path / "curves.png")
    (tmp_path / "curves.png").unlink()
    assert cli(["--plot", str(tmp_path)]) == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "empty").mkdir()
    assert cli(["--plot", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {str(tmp_path / 'empty')!r}: no metrics.jsonl (not the output folder of a run?)"]


def test_a_run_writes_config_csv_and_curves_and_its_config_reruns_it(tmp_path, capsys):
    pytest.importorskip("yaml")

    from tec_fast.cli.train import main
    write_class_folders(tmp_path / "data" / "train", ("a", "b"), 4, (32, 36), np.random.default_rng(0))
    (tmp_path / "run.yaml").write_text(
        f"data: {tmp_path / 'data'}\nobjective: mae\nmodel: vit_demo_patch4\nimg-size: 32\ndecoder-dim: 32\n"
        f"decoder-depth: 1\ndecoder-heads: 2\nbatch-size: 4\nmax-steps: 4\nwarmup-epochs: 0\nlog-every: 1\n"
        f"num-workers: 0\nno-progress: true\n")
    out = tmp_path / "out"
    assert main(["--config", str(tmp_path / "run.yaml"), "--output", str(out), "--max-steps", "3"]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("time,stage,step,epoch,lr,loss")
    if HAS_MPL:
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["--config", str(out / "config.yaml"), "--print-config"]) == 0
    again = capsys.readouterr().out
    written = (out / "config.yaml").read_text()
    assert again == written and "max_steps: 3\n" in written and f"output: {out}\n" in written
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["config"]["max_steps"] == 3 and start["config"]["batch_size"] == 4
    assert torch.load(out / "checkpoint-last.pth", weights_only=False)["step"] == 3


def test_read_jsonl_skips_what_is_not_a_whole_record(tmp_path):
    """Blank, torn and non-object lines are skipped; a last line without its newline is one another
    process is still writing."""
    from tec_fast.training.monitor import read_jsonl
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, "lo\n[1, 2]\n{"step": 3}\n{"step": 4}')
    assert list(read_jsonl(str(path))) == [{"step": 1}, {"step": 3}]
