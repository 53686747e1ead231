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


def test_bench_step_per_weight_casts_provider(tmp_path, monkeypatch):
    """--per-weight-casts adds the engine as fit ran it before casting once (fp32 base under
    autocast, the model called directly) and leaves the engine provider casting once."""
    made = []
    real = bench_step.engine_step_fn

    def spy(*args, cast_once=True, **kwargs):
        made.append(cast_once)
        return real(*args, cast_once=cast_once, **kwargs)
    monkeypatch.setattr(bench_step, "engine_step_fn", spy)
    rows = bench_step.main(["--preset", "tiny", "--device", "cpu", "--batch-sizes", "2", "--steps", "1",
                            "--warmup", "0", "--gemm-size", "128", "--no-baseline", "--per-weight-casts",
                            "--results-dir", str(tmp_path)])
    assert [r["provider"] for r in rows] == ["engine", "engine_autocast"] and made == [True, False]
    base, model = bench_step._engine_models(*bench_step.build("tiny", torch.device("cpu")), torch.device("cpu"),
                                            "bf16", cast_once=False)
    assert base.blocks[0].attn.qkv.weight.dtype == torch.float32
    base, _ = bench_step._engine_models(*bench_step.build("tiny", torch.device("cpu")), torch.device("cpu"), "bf16")
    assert base.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert isinstance(bench_step._as_trained(model, "bf16"), bench_step.CastWeightsOnce)
    assert bench_step._as_trained(model, "bf16", cast_once=False) is model


def test_bench_step_failing_provider_costs_only_its_rows(tmp_path, monkeypatch):
    """One provider that raises (a Triton compile error, a graph capture that fails on the lent GPU)
    is named and the run exits non-zero, after the other providers' rows of every batch size
    were written, each batch size as soon as it was measured."""
    def broken(*args, **kwargs):
        raise ValueError("planted failure")
    monkeypatch.setattr(bench_step, "engine_step_fn", broken)
    with pytest.raises(SystemExit, match=r"B=2 engine: ValueError: planted failure"):
        bench_step.main(["--preset", "tiny", "--device", "cpu", "--batch-sizes", "2", "3", "--steps", "1",
                         "--warmup", "0", "--gemm-size", "128", "--results-dir", str(tmp_path)])
    (path,) = tmp_path.glob("*.jsonl")
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["provider"], r["shape"].split(",")[0]) for r in written] == [("baseline", "B=2"), ("baseline", "B=3")]


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


def test_bench_packed_failing_provider_costs_only_its_rows(tmp_path, monkeypatch):
    """The packed provider failing (its attention backend on the lent GPU) leaves the padded rows
    of every batch size written, each batch size as it was measured, and the run exits non-zero."""
    from benchmarks import bench_packed

    real, calls = bench_packed.time_callable, []

    def timed(fn, *args, **kwargs):  # providers in order: padded, packed
        calls.append(fn)
        if len(calls) % 2 == 0:
            raise ValueError("planted failure")
        return real(fn, *args, **kwargs)
    monkeypatch.setattr(bench_packed, "time_callable", timed)
    with pytest.raises(SystemExit, match=r"B=3 packed: ValueError: planted failure"):
        bench_packed.main(["--preset", "tiny", "--device", "cpu", "--batch-sizes", "2", "3", "--steps", "1",
                           "--warmup", "0", "--results-dir", str(tmp_path)])
    (path,) = tmp_path.glob("*.jsonl")
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["provider"], r["shape"].split(",")[0]) for r in written] == [("padded", "B=2"), ("padded", "B=3")]
    assert "speedup" not in written[0]


def test_bench_step_cuda_graph_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        bench_step.main(["--preset", "tiny", "--device", "cpu", "--cuda-graph"])
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_profile_step_tiny_cpu(tmp_path):
    from benchmarks import profile_step

    rows = profile_step.main(["--preset", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1",
                              "--warmup", "1", "--top", "5", "--python", "--results-dir", str(tmp_path)])
    assert [r["provider"] for r in rows] == ["engine", "baseline"]
    for r in rows:
        assert r["wall_ms"] > 0 and r["gpu_busy_ms"] == 0 and r["launches"] == 0  # no GPU: host only
        assert r["kernels"] == "auto" and 0 < len(r["top_host"]) <= 5
        assert all(row["self_cpu_ms"] >= 0 and row["calls"] >= 0 for row in r["top_host"])
        assert 0 < len(r["top_python"]) <= 5 and all(row["own_ms"] >= 0 for row in r["top_python"])
    written = [json.loads(line) for line in (tmp_path / "profile.jsonl").read_text().splitlines()]
    assert [r["provider"] for r in written] == ["engine", "baseline"]
    assert not any(r["shapes_recorded"] for r in written)
    (row,) = profile_step.main(["--preset", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1",
                                "--warmup", "1", "--no-baseline", "--shapes", "--results-dir", str(tmp_path)])
    assert row["shapes_recorded"] and row["top_device_shapes"] == []  # no device time on a CPU


def test_report_tables_keep_measured_gpu_rows_only():
    from benchmarks import report

    common = dict(device="NVIDIA_H200", preset="vit_base", dtype="bf16", compile=False, commit="abc",
                  timestamp="2026-11-30T00:00:00")
    rows = [dict(common, bench="step", provider="engine", shape="B=64,S=224", img_per_s=1000.0, speedup=0.8),
            dict(common, bench="step", provider="engine_graph", shape="B=64,S=224", img_per_s=2500.0, speedup=2.0),
            dict(common, bench="traffic", provider="engine", shape="B=256", device="fake-tensors (estimate)"),
            dict(common, bench="compile", provider=None, shape="vitb"),
            dict(common, bench="layer_norm_fwd", provider="triton", shape="rows=8", median_ms=0.05),
            dict(common, bench="step", provider="engine", shape="B=4,S=32", device="cpu-x86_64-2c"),
            dict(device="NVIDIA_H200", table="step", provider="engine", host_ms=9.0, commit="abc")]  # host_overhead
    text = report.tables(rows)
    assert "| engine_graph |" in text and "2.00x" in text and "0.80x" in text
    assert "layer_norm_fwd" in text and "| None |" not in text
    assert "`engine_graph`:" in text and "engine_fit_graph" not in text  # the caption names the modes shown
    assert "fake-tensors" not in text and "| compile |" not in text and "cpu-x86_64" not in text
    assert report.tables([rows[-1]]).startswith("No GPU results yet")


def test_report_host_table_takes_the_newest_commits_runs():
    """The host-cost table: only the newest commit's CPU rows, each run's (ours, reference) pairs in
    file order, the median host time and the range of the ratio over the runs."""
    from benchmarks import report

    def run(commit, stamp, step_ms, eager_ms, ln_us, ref_us):
        common = dict(device="cpu-x86_64-2c", commit=commit, timestamp=stamp, threads=1)
        return [dict(common, table="step", provider="engine", host_ms=step_ms, vs_eager=step_ms / eager_ms),
                dict(common, table="step", provider="eager", host_ms=eager_ms, vs_eager=1.0),
                dict(common, table="op", op="layer_norm", provider="triton", fwd_us=ln_us, bwd_us=2 * ln_us,
                     fwdbwd_vs_reference=ln_us / ref_us),
                dict(common, table="op", op="layer_norm", provider="reference", fwd_us=ref_us, bwd_us=2 * ref_us,
                     fwdbwd_vs_reference=1.0)]
    rows = (run("old", "2026-12-01T00:00:00", 30.0, 20.0, 50.0, 10.0)
            + run("new", "2026-12-06T00:00:00", 9.0, 10.0, 12.0, 10.0)
            + run("new", "2026-12-06T00:01:00", 8.0, 10.0, 14.0, 10.0)
            + run("new", "2026-12-06T00:02:00", 10.0, 10.0, 13.0, 10.0))
    text = report.host_table(rows)
    assert "commit new, 3 runs" in text
    assert "| 9.0 ms | 10.0 ms | 0.80-1.00x | <= 0.5x |" in text  # step: median of 8, 9, 10
    assert "| `layer_norm` fwd + bwd | 39 us | 30 us | 1.20-1.40x | <= 1.5x |" in text
    assert "30.0" not in text and "5.00x" not in text  # the old commit's run is left out
    assert report.host_table([]).startswith("No host-cost rows yet")
    # --launch-path runs go to their own two columns, never into the stubbed ones
    launch = [dict(r, launch_path=True) for r in run("newer", "2026-12-07T00:00:00", 11.0, 10.0, 20.0, 10.0)]
    text = report.host_table(rows + launch)
    assert "commit new, 3 runs" in text and "commit newer, 1 run)" in text
    assert "| 9.0 ms | 10.0 ms | 0.80-1.00x | 11.0 ms | 1.10-1.10x | <= 0.5x |" in text
    assert "| `layer_norm` fwd + bwd | 39 us | 30 us | 1.20-1.40x | 60 us | 2.00-2.00x | <= 1.5x |" in text
    # TEC_FAST_LAUNCH=0 runs (Triton's JITFunction.run on every launch) are comparisons: left out
    reuse = [dict(r, launch="1") for r in launch]
    plain = [dict(r, launch="0", timestamp="2026-12-08T00:00:00", host_ms=99.0, vs_eager=9.9) for r in launch]
    text = report.host_table(rows + reuse + plain)
    assert "reused by call signature" in text and "99.0" not in text and "9.90x" not in text
    assert "| 9.0 ms | 10.0 ms | 0.80-1.00x | 11.0 ms | 1.10-1.10x | <= 0.5x |" in text
    # a subset or smoke run (full_run false) never becomes the table; full runs marked as such do
    smoke = [dict(r, full_run=False, timestamp="2026-12-09T00:00:00", host_ms=77.0, vs_eager=7.7)
             for r in run("smoke", "2026-12-09T00:00:00", 77.0, 10.0, 70.0, 10.0)]
    text = report.host_table(rows + smoke)
    assert "commit new, 3 runs" in text and "77.0" not in text and "smoke" not in text
    marked = [dict(r, full_run=True) for r in run("marked", "2026-12-09T00:00:00", 9.5, 10.0, 12.0, 10.0)]
    assert "commit marked, 1 run" in report.host_table(rows + smoke + marked)
    assert "2-core CPU, one thread" in text
    assert "4-core CPU, 2 threads" in report.host_table([dict(r, device="cpu-x86_64-4c", threads=2) for r in rows])


def test_report_commit_cells():
    from benchmarks import report
    assert report._commit({"commit": "186429e-dirty"}) == "186429e (dirty)"
    assert report._commit({"commit": "0e9ce13"}) == "0e9ce13"


def test_git_commit_is_dirty_for_code_changes_not_for_appended_results(tmp_path, monkeypatch):
    """Rows record the commit they measured: appending a run's rows to ``benchmarks/results/``
    does not mark the next run of the series ``-dirty``; a changed source file does."""
    import subprocess

    from benchmarks import common

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(common, "REPO", str(tmp_path))
    monkeypatch.setattr(common, "code_outside_checkout", lambda repo=None: [])  # tec_fast is not in tmp_path
    head = common.git_commit()
    assert head != "unknown" and not head.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "rows.jsonl").write_text("{}\n{}\n")
    assert common.git_commit() == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.git_commit() == head + "-dirty"


def test_rows_of_code_from_another_checkout_are_marked_mixed_and_left_out(tmp_path, monkeypatch, capsys):
    """A run whose ``tec_fast.kernels`` (or ``tec_fast``) comes from another folder than the
    checkout whose commit it records (an older commit's worktree with the main checkout's
    editable install) is marked ``-mixed``, says so once, and the README's host table skips it."""
    from benchmarks import common, report
    assert common.code_outside_checkout() == []  # this checkout runs its own code
    outside = common.code_outside_checkout(str(tmp_path))
    assert [o.split(" ")[0] for o in outside] == ["tec_fast", "tec_fast.kernels"]
    monkeypatch.setattr(common, "REPO", str(tmp_path))
    monkeypatch.setattr(common, "_WARNED_MIXED", [])
    assert common.git_commit().endswith("-mixed")
    assert common.git_commit().endswith("-mixed")
    err = capsys.readouterr().err
    assert err.count("rows are marked '-mixed'") == 1 and "tec_fast.kernels (" in err
    row = dict(table="step", device="cpu-x86_64-2c", threads=1, launch_path=False, full_run=True)
    rows = [dict(row, commit="abc1234", timestamp="1"), dict(row, commit="def5678-mixed", timestamp="2")]
    assert report._host_runs(rows, False) == ("abc1234", rows[:1])
