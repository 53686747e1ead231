"""The whole-step benchmark runs at a tiny size on CPU and writes complete result rows."""
import json

from benchmarks import bench_step


def test_bench_step_tiny_cpu(tmp_path):
    rows = bench_step.main(["--preset", "tiny", "--device", "cpu", "--batch-sizes", "2", "--steps", "1",
                            "--warmup", "0", "--results-dir", str(tmp_path)])
    assert {r["provider"] for r in rows} == {"engine", "baseline"}
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    written = [json.loads(line) for line in files[0].read_text().splitlines()]
    engine = next(r for r in written if r["provider"] == "engine")
    for key in ("bench", "device", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_gb", "torch",
                "triton", "commit", "timestamp", "img_per_s", "baseline_img_per_s", "speedup", "mfu",
                "baseline_peak_mem_gb"):
        assert key in engine, key
    assert engine["speedup"] > 0 and engine["gflop_per_img"] > 0


def test_bench_packed_tiny_cpu(tmp_path):
    from benchmarks import bench_packed

    rows = bench_packed.main(["--preset", "tiny", "--device", "cpu", "--batch", "3", "--steps", "1",
                              "--warmup", "0", "--results-dir", str(tmp_path)])
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"packed", "padded"}
    assert by["packed"]["tokens"] <= by["padded"]["tokens"]
    assert by["packed"]["speedup"] > 0
