"""What the train command writes besides the model: the closing summary table, config.yaml
(never the flags of this one invocation), curves.png only where the log holds steps, and what
--overwrite deletes."""
from __future__ import annotations

import json
import re
import types

import pytest

from tec_fast.cli.train import fresh_output, parse_args, run_config, summary, write_curves


def _rows(text):
    lines = text.splitlines()
    assert lines[0] == "summary" and lines[1].split() == ["this", "run"] and set(lines[2]) <= {"-", " "}
    return dict(re.split(r"\s{2,}", ln, maxsplit=1) for ln in lines[3:])


def test_the_summary_names_processes_unreadable_images_and_the_last_losses():
    result = types.SimpleNamespace(
        steps=7, total_steps=10, stopped="time limit", epoch=1, global_batch=256, lr=0.00123, optimizer="fused",
        precision="bf16", cuda_graph="off", seconds=65.2, img_per_s=1234.56,
        metrics={"loss": 0.5, "feature": 0.25}, unreadable=["a.jpg", "b.jpg"], checkpoint="out/checkpoint-last.pth")
    rows = _rows(summary(types.SimpleNamespace(objective="tec"), result, "bf16", 4, "out/encoder.pth", None))
    assert rows["stage"] == "tec" and rows["steps"] == "7 / 10 (time limit)" and rows["peak lr"] == "0.00123"
    assert rows["processes"] == "4" and rows["wall time"] == "1:05" and rows["throughput"] == "1234.6 img/s"
    assert rows["loss (last step)"] == "0.5000" and rows["feature (last step)"] == "0.2500"
    assert rows["unreadable images"] == "2 (skipped)" and rows["encoder"] == "out/encoder.pth"


def test_config_yaml_leaves_out_resume(tmp_path):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    args = parse_args(["--data", str(tmp_path / "d"), "--objective", "mae", "--resume",
                       "--output", str(tmp_path / "o"), "--max-steps", "5"])
    text = run_config(args)
    keys = {ln.split(":", 1)[0] for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert "max_steps" in keys and "data" in keys
    assert not keys & {"resume", "overwrite", "bench_loader"}


def test_no_curves_from_a_log_without_step_records(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"event": "start", "stage": "tec", "step": 4}) + "\n")
        f.write(json.dumps({"event": "end", "stage": "tec", "step": 4}) + "\n")
    assert write_curves(str(tmp_path)) is None
    assert not (tmp_path / "curves.png").exists()


def test_overwrite_deletes_the_earlier_runs_csv_too(tmp_path):
    for name in ("metrics.jsonl", "metrics.csv", "wandb-run-id"):
        (tmp_path / name).write_text("x\n")
    said = []
    with pytest.raises(ValueError, match="metrics.jsonl, metrics.csv, wandb-run-id"):
        fresh_output(str(tmp_path), False, said.append)
    fresh_output(str(tmp_path), True, said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert said == [f"--overwrite: deleted 3 files of the earlier run in {tmp_path}: "
                    f"metrics.jsonl, metrics.csv, wandb-run-id"]
