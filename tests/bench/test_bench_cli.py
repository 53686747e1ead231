"""The benchmark scripts' command lines: a bad value or a device this machine lacks ends the run
with one ``error: argument --FLAG: ...`` line and exit status 2 before anything is built or timed;
the usage line names ``python -m benchmarks.<script>``; long runs say which case runs (stderr);
flops.py prints the step's FLOPs by part."""
import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import refused_in_one_line
from benchmarks import flops
from benchmarks.common import REPO, fx_tracing_notice_dropped, time_callable


def _refused(capsys, module: str, argv, flag: str) -> str:
    return refused_in_one_line(importlib.import_module(f"benchmarks.{module}").main, argv, capsys, flag)


# the rest of each command line keeps a run that was wrongly let through small and quick
CHEAP = {
    "bench_step": ["--preset", "tiny", "--no-baseline", "--gemm-size", "16"],
    "bench_ops": ["--op", "layer_norm"],
    "bench_packed": ["--preset", "tiny"],
    "bench_packing": ["--batch", "2", "--seq-len", "4", "--dim", "4", "--n-seqs", "10", "--capacity", "64",
                      "--min-len", "1", "--max-len", "32", "--reps", "1"],
    "profile_step": ["--preset", "tiny", "--no-baseline"],
    "traffic": ["--model", "tiny", "--no-save"],
}
DEVICE_SCRIPTS = ("bench_step", "bench_ops", "bench_packed", "bench_packing", "profile_step")


@pytest.mark.parametrize("module", DEVICE_SCRIPTS)
def test_a_cuda_device_this_machine_lacks_is_one_error_line(module, capsys, tmp_path):
    if torch.cuda.is_available():  # a GPU machine: one past its last device
        device, why = f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"
    else:
        device, why = "cuda", "cuda: no CUDA device here"
    line = _refused(capsys, module, CHEAP[module] + ["--device", device, "--results-dir", str(tmp_path)],
                    "--device")
    assert why in line
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.parametrize("module", DEVICE_SCRIPTS + ("gemm_epilogue",))
def test_an_unknown_device_is_refused(module, capsys, tmp_path):
    line = _refused(capsys, module, CHEAP.get(module, []) + ["--device", "gpu", "--results-dir", str(tmp_path)],
                    "--device")
    assert "expected cpu, cuda or cuda:N, got 'gpu'" in line


@pytest.mark.parametrize("module, argv, flag, why", [
    ("bench_step", ["--batch-sizes", "4", "0"], "--batch-sizes", "must be >= 1, got 0"),
    ("bench_step", ["--mask-ratio", "1.5"], "--mask-ratio", "must be in (0, 1), got 1.5"),
    ("bench_step", ["--mask-ratio", "nan"], "--mask-ratio", "finite"),
    ("bench_step", ["--steps", "0"], "--steps", "must be >= 1, got 0"),
    ("bench_step", ["--warmup", "-1"], "--warmup", "must be >= 0, got -1"),
    ("bench_ops", ["--reps", "0"], "--reps", "must be >= 1, got 0"),
    ("bench_ops", ["--warmup", "-2"], "--warmup", "must be >= 0, got -2"),
    ("bench_ops", ["--provider", "triton", "--device", "cpu"], "--provider", "need a CUDA device"),
    ("bench_packed", ["--batch", "0"], "--batch", "must be >= 1, got 0"),
    ("bench_packed", ["--steps", "0"], "--steps", "must be >= 1, got 0"),
    ("bench_packed", ["--ratios", "0.5:1"], "--ratios", "need 0 < LO <= HI < 1"),
    ("bench_packing", ["--mask-ratio", "2"], "--mask-ratio", "must be in (0, 1)"),
    ("bench_packing", ["--mask-ratio", "0.9:0.6"], "--mask-ratio", "LO <= HI"),
    ("bench_packing", ["--reps", "0"], "--reps", "must be >= 1, got 0"),
    ("bench_packing", ["--dtypes", "fp32,fp8"], "--dtypes", "got 'fp32,fp8'"),
    ("bench_packing", ["--max-len", "100", "--capacity", "50"], "--max-len", "above --capacity 50"),
    ("profile_step", ["--batch", "0"], "--batch", "must be >= 1, got 0"),
    ("profile_step", ["--mask-ratio", "1"], "--mask-ratio", "must be in (0, 1), got 1"),
    ("profile_step", ["--steps", "0"], "--steps", "must be >= 1, got 0"),
    ("traffic", ["--batch", "0"], "--batch", "must be >= 1, got 0"),
    ("traffic", ["--mask-ratio", "1.2"], "--mask-ratio", "must be in (0, 1), got 1.2"),
])
def test_bad_values_are_refused_at_parse_time(module, argv, flag, why, capsys, tmp_path):
    out = ["--results-dir", str(tmp_path)] if module != "traffic" else []
    line = _refused(capsys, module, CHEAP[module] + argv + out, flag)  # the last of a repeated flag wins
    assert why in line


def test_time_callable_times_at_least_one_call():
    with pytest.raises(ValueError, match="reps >= 1"):
        time_callable(lambda: None, "cpu", reps=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        time_callable(lambda: None, "cpu", warmup=-1)


@pytest.mark.parametrize("module", ["bench_step", "bench_ops", "bench_packed", "bench_packing", "bench_loader",
                                    "profile_step", "traffic", "flops", "compile_report", "gemm_epilogue"])
def test_usage_names_the_module_command(module, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"benchmarks.{module}").main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: python -m benchmarks.{module} ")


def test_help_says_where_rows_go(capsys):
    for module, says in (("bench_loader", ["default benchmarks/results/loader.jsonl", "--img-size IMG_SIZE  side"]),
                         ("compile_report", ["default benchmarks/results/compile.jsonl.gz", "spill st/ld B  bytes"])):
        with pytest.raises(SystemExit):
            importlib.import_module(f"benchmarks.{module}").main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        for text in says:
            assert " ".join(text.split()) in out, (module, text)


def test_flops_default_is_the_documented_vit_b_step(capsys):
    parts = flops.main([])
    assert abs(parts["total"] / 1e9 - 84.7) < 0.05
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    rows = {line.split("  ")[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["total"][1:] == ["84.7", "84.7"]  # per image, per step of one image
    assert rows["frozen base, forward"][-2:] == ["35.1", "35.1"]


def test_flops_per_step_and_bad_sizes(capsys):
    parts = flops.main(["--model", "tiny", "--batch", "8"])
    total = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert float(total[2]) == pytest.approx(round(8 * parts["total"] / 1e9, 1), abs=0.051)
    _refused(capsys, "flops", ["--img-size", "100"], "--img-size")  # not a multiple of the patch size
    _refused(capsys, "flops", ["--batch", "0"], "--batch")
    _refused(capsys, "flops", ["--mask-ratio", "0"], "--mask-ratio")


def test_bench_ops_says_which_case_runs(capsys, tmp_path):
    import benchmarks.bench_ops as bench_ops

    bench_ops.main(["--op", "layer_norm", "--device", "cpu", "--reps", "1", "--warmup", "0",
                    "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" B=")[0] for line in err] == ["[1/1] layer_norm fwd", "[1/1] layer_norm fwd+bwd"]
    assert all(line.endswith(" ...") for line in err)


def test_fx_tracing_notice_is_dropped_within_the_block_only():
    logger = logging.getLogger("torch.fx._symbolic_trace")
    record = lambda msg: logger.makeRecord(logger.name, logging.WARNING, __file__, 0, msg, (), None)  # noqa: E731
    notice = record("is_fx_tracing will return true for both fx.symbolic_trace and torch.export. ...")
    with fx_tracing_notice_dropped():
        assert not logger.filter(notice) and logger.filter(record("another warning"))
    assert logger.filter(notice)


def test_bench_packed_shows_progress_and_no_torch_notice(tmp_path):
    """In a fresh process (torch logs the notice once per process): one line per provider on
    stderr, and not torch's is_fx_tracing notice, which its nested tensors would print."""
    env = {k: v for k, v in os.environ.items() if k != "TEC_FAST_PACKED_ATTENTION"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_packed", "--device", "cpu", "--preset", "tiny",
                          "--batch", "2", "--steps", "1", "--warmup", "0", "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "packed attention: nested" in run.stdout  # the backend whose tensors log the notice (CPU)
    assert run.stderr.splitlines() == ["[1/2] padded B=2 ...", "[2/2] packed B=2 ..."], run.stderr
