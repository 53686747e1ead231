"""The data of curves.png: step records per stage (events left out), sorted into loss terms,
accuracies, learning rate and throughput."""
from __future__ import annotations

import json

from tec_fast.training.curves import curves, read_steps


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_events_with_a_step_are_not_step_records(tmp_path):
    _write(tmp_path / "m.jsonl", [
        {"event": "start", "stage": "tec", "step": 0, "loss": 9.0},
        {"stage": "tec", "step": 1, "loss": 1.0},
        {"event": "checkpoint", "stage": "tec", "step": 1, "loss": 8.0},
        {"event": "end", "stage": "tec", "step": 1}])
    assert read_steps(str(tmp_path / "m.jsonl")) == {"tec": {1: {"stage": "tec", "step": 1, "loss": 1.0}}}


def test_stages_are_kept_apart(tmp_path):
    _write(tmp_path / "m.jsonl", [
        {"stage": "mae", "step": 1, "loss": 2.0}, {"stage": "tec", "step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5}])
    steps = read_steps(str(tmp_path / "m.jsonl"))
    assert {k: {s: r["loss"] for s, r in v.items()} for k, v in steps.items()} == {
        "mae": {1: 2.0}, "tec": {1: 1.0}, "train": {2: 0.5}}


def test_series_sort_terms_accuracies_lr_and_speed():
    stages = {"tec": {
        2: {"time": 5.0, "stage": "tec", "step": 2, "epoch": 0, "lr": 0.2, "loss": 0.5, "train_acc": 0.75,
            "img_per_s": 20.0, "elapsed_s": 2.0, "grad_norm": 3.0, "graph": True},
        1: {"time": 4.0, "stage": "tec", "step": 1, "epoch": 0, "lr": 0.1, "loss": 1.0, "train_acc": 0.5,
            "img_per_s": 10.0, "elapsed_s": 1.0, "grad_norm": 4.0, "graph": False}}}
    losses, accuracy, lr, speed = curves(stages)
    assert losses == {"tec loss": [(1, 1.0), (2, 0.5)]}
    assert accuracy == {"tec train_acc": [(1, 0.5), (2, 0.75)]}
    assert lr == {"tec": [(1, 0.1), (2, 0.2)]} and speed == {"tec": [(1, 10.0), (2, 20.0)]}
