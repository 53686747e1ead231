"""The progress line, metrics.jsonl / metrics.csv mirroring, the plain-text table and
StepMeter's means, checked against values worked out by hand."""
from __future__ import annotations

import io
import json
import sys
import types


from tec_fast.training import monitor
from tec_fast.training.monitor import MetricsLog, Progress, StepMeter, format_duration, table


class _Clock:
    """A perf_counter that returns the given times in turn."""

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def _fake_time(monkeypatch, *times):
    import time
    monkeypatch.setattr(monitor, "time", types.SimpleNamespace(perf_counter=_Clock(*times), time=time.time))


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_durations_read_as_clock_times():
    assert format_duration(0) == "0:00"
    assert format_duration(65) == "1:05"
    assert format_duration(599.6) == "10:00"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(-1) == "?" and format_duration(float("nan")) == "?" and format_duration(float("inf")) == "?"


def test_eta_counts_only_the_steps_this_run_made(monkeypatch):
    # started at step 10 of 30 at t=0; at t=10 s it is at step 20: 10 steps in 10 s, 10 to go
    _fake_time(monkeypatch, 0.0, 10.0)
    buf = io.StringIO()
    p = Progress("tec", total_steps=30, start_step=10, every=10, stream=buf)
    p.update(20, 1, 123.4, {"loss": 0.5}, 1e-4)
    line = buf.getvalue()
    assert line.endswith("ETA 0:10\n"), line
    assert " 20/30 " in line and "123.4 img/s" in line and "loss 0.5000" in line and " 67%" in line


def test_a_resumed_run_prints_its_first_step_and_its_last_off_a_terminal():
    buf = io.StringIO()
    p = Progress("tec", total_steps=25, start_step=10, every=10, stream=buf)
    for step in range(11, 26):
        p.update(step, 0, 1.0, {"loss": 1.0}, 1e-4)
    p.close()
    assert [ln.split()[1] for ln in buf.getvalue().splitlines()] == ["11/25", "20/25", "25/25"]


def test_on_a_terminal_the_line_is_redrawn_and_the_last_one_ends_it(monkeypatch):
    # draws at t=1 (step 1), skipped at t=1.1 (step 2, < 0.25 s later), the last step always drawn
    _fake_time(monkeypatch, 0.0, 1.0, 1.1, 1.2)
    buf = _Tty()
    p = Progress("tec", total_steps=3, every=1, stream=buf)
    for step in (1, 2, 3):
        p.update(step, 0, 10.0, {"loss": 1.0}, 1e-3)
    out = buf.getvalue()
    assert out.count("\r") == 2 and out.count("\x1b[K") == 2 and "|" in out
    assert " 1/3 " in out and " 2/3 " not in out and " 3/3 " in out
    assert out.endswith("\x1b[K\n") and out.count("\n") == 1
    p.close()
    assert buf.getvalue() == out  # the line is already ended: no second newline


def test_closing_a_terminal_line_drawn_before_the_end_ends_it(monkeypatch):
    _fake_time(monkeypatch, 0.0, 1.0)
    buf = _Tty()
    p = Progress("tec", total_steps=10, every=1, stream=buf)
    p.update(1, 0, 10.0, {"loss": 1.0}, 1e-3)
    assert not buf.getvalue().endswith("\n")
    p.close()
    assert buf.getvalue().endswith("\x1b[K\n")


def test_tuples_of_non_finite_values_are_written_as_null(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.write({"event": "x", "pair": (1.0, float("nan")), "nested": [(float("inf"), 2)]})
    log.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["pair"] == [1.0, None] and record["nested"] == [[None, 2]]


def test_wandb_and_tensorboard_get_numbers_under_the_stage_and_not_epoch_or_flags(tmp_path, monkeypatch):
    runs, writers = [], []

    class Run:
        def __init__(self, kw):
            self.logged, self.id = [], "r1"

        def log(self, data, step):
            self.logged.append((step, data))

        def finish(self):
            pass

    class Writer:
        def __init__(self, folder):
            self.scalars = []
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def close(self):
            pass

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(Run(kw)) or runs[-1]
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), tensorboard_dir=str(tmp_path / "tb"), wandb_project="p")
    log.write({"stage": "mae", "step": 7, "epoch": 2, "loss": 0.5, "lr": 0.1, "graph": True, "note": "x"})
    log.close()
    assert runs[0].logged == [(7, {"mae/loss": 0.5, "mae/lr": 0.1})]
    assert sorted(writers[0].scalars) == [("mae/loss", 0.5, 7), ("mae/lr", 0.1, 7)]


def test_table_aligns_the_first_column_left_and_the_others_right():
    text = table(["name", "n"], [["a", 1], ["bbbbbb", 22]], title="t")
    assert text.split("\n") == ["t", "name     n", "------  --", "a        1", "bbbbbb  22"]


def test_a_key_value_table_has_no_heading_row_and_no_trailing_spaces():
    text = table(["", ""], [["steps", "3"], ["a longer key", "xyz"]], align="ll")
    assert text.split("\n") == ["------------  ---", "steps         3", "a longer key  xyz"]


class _Log:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def close(self):
        pass


def test_step_records_hold_the_means_and_rates_of_their_own_steps(monkeypatch):
    # Progress off (it reads no clock); the meter starts at t=0, steps end at t=1, 2, 4
    _fake_time(monkeypatch, 0.0, 0.0, 1.0, 2.0, 4.0)
    log = _Log()
    meter = StepMeter("tec", log, Progress("tec", 3, enabled=False), log_every=2, total_steps=3)
    for step, loss in ((1, 4.0), (2, 2.0), (3, 1.0)):
        meter.record(step, 0, {"loss": loss}, images=8, lr=0.1, elapsed_s=float(step))
    assert [r["step"] for r in log.records] == [2, 3]  # every 2 steps, and the last
    assert log.records[0]["loss"] == 3.0 and log.records[1]["loss"] == 1.0
    assert log.records[0]["img_per_s"] == 8.0  # 16 images in 2 s
    assert log.records[1]["img_per_s"] == 4.0  # 8 images in the 2 s since the first record
    assert meter.losses == [4.0, 2.0, 1.0]


def test_a_resumed_log_starts_a_new_line_after_a_torn_one(tmp_path):
    """A run killed mid-write leaves a last line without its newline: the next run's first record
    joined it (one line, unreadable, skipped) in metrics.jsonl and in metrics.csv."""
    import csv

    from tec_fast.training.monitor import MetricsLog, read_jsonl
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(str(path))
    for step in (1, 2):
        log.write({"stage": "tec", "step": step, "loss": 1.0 / step})
    log.close()
    with open(path, "a") as f:
        f.write('{"stage": "tec", "step": 3, "lo')
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("9")
    log = MetricsLog(str(path))
    log.write({"event": "start", "step": 2})
    log.write({"stage": "tec", "step": 3, "loss": 0.25})
    log.close()
    records = list(read_jsonl(str(path)))
    assert [(r.get("event"), r["step"]) for r in records] == [(None, 1), (None, 2), ("start", 2), (None, 3)]
    rows = list(csv.reader(open(tmp_path / "metrics.csv", newline="")))
    assert rows[0] == ["time", "stage", "step", "loss"]
    assert [r[1:] for r in rows[1:3]] == [["tec", "1", "1.0"], ["tec", "2", "0.5"]]
    assert rows[3] == ["9"] and rows[4][1:] == ["tec", "3", "0.25"]
