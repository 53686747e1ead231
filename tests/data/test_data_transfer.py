"""uint8 batches normalised on the device, and --bench-loader: bytes per image, the step rate it
sizes the workers for (given, or the newest committed step result), its table and JSON line."""
from __future__ import annotations

import json

import pytest
import torch

from data_helpers import write_folder
from tec_fast.data.transfer import to_device
from tec_fast.data.transforms import normalize
from tec_fast.training.loader_bench import batch_bytes, loader_report, newest_step_result, workers_needed


def test_to_device_normalises_uint8_images_only():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    noise = torch.rand(2, 5)
    labels = torch.tensor([3, 1])
    x, y, z = to_device((images, labels, noise), torch.device("cpu"))
    assert torch.equal(x, normalize(images)) and x.dtype == torch.float32
    assert torch.equal(y, labels) and torch.equal(z, noise)
    mask = torch.zeros(2, 3, 4, dtype=torch.uint8)  # 3-D uint8: not images
    assert torch.equal(to_device({"m": mask}, torch.device("cpu"))["m"], mask)

    class Moves:
        def to(self, device, non_blocking=False):
            return ("moved", str(device), non_blocking)
    assert to_device([Moves()], torch.device("cpu")) == [("moved", "cpu", True)]


def test_batch_bytes_counts_what_crosses_the_boundary():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    assert batch_bytes((images, torch.zeros(4, dtype=torch.int64))) == 4 * 3 * 64 + 4 * 8
    assert batch_bytes((images.float(),)) == 4 * batch_bytes(images)


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_newest_step_result(tmp_path):
    _rows(tmp_path / "a.jsonl", [
        {"bench": "step", "device": "GPU_A", "timestamp": "2026-01-01", "provider": "engine", "img_per_s": 100.0},
        {"bench": "step", "device": "GPU_A", "timestamp": "2026-02-01", "provider": "engine", "img_per_s": 150.0},
        {"bench": "step", "device": "GPU_A", "timestamp": "2026-02-01", "provider": "graph", "img_per_s": 180.0},
        {"bench": "relation_loss_fwd", "device": "GPU_A", "timestamp": "2026-03-01", "img_per_s": 9e9}])
    _rows(tmp_path / "b.jsonl", [
        {"bench": "step", "device": "GPU_B", "timestamp": "2026-03-01", "provider": "engine", "img_per_s": 50.0}])
    (tmp_path / "c.jsonl").write_text("not json\n")
    assert newest_step_result("GPU_A", str(tmp_path))["img_per_s"] == 180.0   # newest run, its fastest row
    assert newest_step_result(None, str(tmp_path))["device"] == "GPU_B"      # any GPU: the newest
    assert newest_step_result("GPU_C", str(tmp_path)) is None
    assert workers_needed(3700, 500.0) == 8 and workers_needed(100, 400) == 1 and workers_needed(100, None) is None


def test_loader_report_prefers_the_given_rate():
    r = {"img_per_s": 300.0, "num_workers": 2, "img_per_cpu_s": 400.0}
    out = loader_report(r, 1000.0, torch.device("cpu"))
    assert out["per_worker_img_s"] == 400.0 and out["workers_needed"] == 3 and out["target_source"] == "--target-img-s"
    out = loader_report(dict(r, img_per_cpu_s=None), 1000.0, torch.device("cpu"))
    assert out["per_worker_img_s"] == 150.0 and out["workers_needed"] == 7


def test_loader_report_says_when_the_step_rate_is_of_another_image_size(tmp_path, monkeypatch):
    """The committed step rate is of 224 px images: a loader measured at another size is told so."""
    from tec_fast.training import loader_bench

    _rows(tmp_path / "a.jsonl", [{"bench": "step", "device": "GPU_A", "timestamp": "2026-01-01", "provider": "engine",
                                  "shape": "B=64,S=224", "img_per_s": 3700.0}])
    monkeypatch.setattr(loader_bench, "results_dir", lambda: str(tmp_path))
    r = {"img_per_s": 300.0, "num_workers": 2, "img_per_cpu_s": 400.0}
    out = loader_report(r, None, torch.device("cpu"), img_size=32)
    assert out["target_img_s"] == 3700.0 and "a step on 224 px images, the loader measured on 32 px" in out["target_source"]
    assert "px" not in loader_report(r, None, torch.device("cpu"), img_size=224)["target_source"]


def test_bench_loader_command(tmp_path, capsys):
    from tec_fast.cli.train import main

    data = write_folder(tmp_path / "imgs", n=8, png_every=3)
    out = tmp_path / "run"
    assert main(["--objective", "mae", "--data", data, "--bench-loader", "--img-size", "16", "--batch-size", "2",
                 "--num-workers", "1", "--target-img-s", "1000", "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "workers needed per GPU" in text and "--target-img-s" in text
    record = json.loads((out / "bench_loader.jsonl").read_text().splitlines()[-1])
    assert record["bytes_per_image"] == pytest.approx(3 * 16 * 16 + 8)  # uint8 image + int64 label
    assert record["images"] > 0 and record["workers_needed"] >= 1 and record["target_img_s"] == 1000.0
