"""The whole-step benchmark runs at a tiny size on CPU and writes complete result rows."""
import json

import pytest
import torch

from benchmarks import bench_step


def test_bench_step_tiny_cpu(tmp_path):
    rows = bench_step.main(["--preset", "tiny", "--device", "cpu", "--batch-sizes", "2", "--steps", "1",
                            "--warmup", "0", "--gemm-size", "128", "--results-dir", str(tmp_path)])
    assert {r["provider"] for r in rows} == {"engine", "baseline"}
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    written = [json.loads(line) for line in files[0].read_text().splitlines()]
    engine = next(r for r in written if r["provider"] == "engine")
    for key in ("bench", "device", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_gb", "torch",
                "triton", "commit", "timestamp", "img_per_s", "baseline_img_per_s", "speedup", "mfu",
                "baseline_peak_mem_gb", "gemm_tflops", "mfu_measured_peak", "published_peak_tflops",
                "model_tflops"):
        assert key in engine, key
    assert engine["speedup"] > 0 and engine["gflop_per_img"] > 0
    # MFU against the GEMM measured in this run; no published peak for a CPU, so no MFU against it
    assert engine["gemm_tflops"] > 0
    assert engine["mfu_measured_peak"] == pytest.approx(engine["model_tflops"] / engine["gemm_tflops"])
    assert engine["published_peak_tflops"] is None and engine["mfu"] is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("Some Future GPU", None)])
def test_published_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench_step.published_peak_tflops(torch.device("cuda")) == peak


def test_bench_packed_tiny_cpu(tmp_path):
    from benchmarks import bench_packed

    rows = bench_packed.main(["--preset", "tiny", "--device", "cpu", "--batch", "3", "--steps", "1",
                              "--warmup", "0", "--results-dir", str(tmp_path)])
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"packed", "padded"}
    assert by["packed"]["tokens"] <= by["padded"]["tokens"]
    assert by["packed"]["speedup"] > 0
