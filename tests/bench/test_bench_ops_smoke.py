"""benchmarks/bench_ops.py runs on CPU at tiny sizes and writes well-formed result rows."""
import glob
import json
import os

import pytest

from benchmarks import bench_ops

KEYS = {"bench", "provider", "device", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_gb",
        "torch", "triton", "commit", "timestamp", "timing", "cpu_model"}


def _rows(results_dir):
    (path,) = glob.glob(os.path.join(results_dir, "*.jsonl"))
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_reference_all_ops(tmp_path):
    bench_ops.main(["--op", "all", "--device", "cpu", "--reps", "1", "--warmup", "0",
                    "--results-dir", str(tmp_path)])
    rows = _rows(tmp_path)
    assert {r["bench"] for r in rows} >= {f"{op}_fwd" for op in bench_ops.OPS}
    assert "relation_loss_fwdbwd" in {r["bench"] for r in rows}
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["median_ms"] > 0 and r["device"].startswith("cpu")
        assert r["provider"] in ("reference", "eager_full_attention")


def test_triton_provider_through_interpreter(tmp_path):
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("TRITON_INTERPRET is off")
    bench_ops.main(["--op", "masked_gather", "--device", "cpu", "--interpret", "--reps", "1",
                    "--warmup", "0", "--results-dir", str(tmp_path)])
    rows = _rows(tmp_path)
    triton_rows = [r for r in rows if r["provider"] == "triton"]
    assert len(triton_rows) == 2 and all(r["speedup"] > 0 for r in triton_rows)


def test_cuda_graph_timing_needs_cuda(capsys):
    from benchmarks import bench_ops
    from benchmarks.common import time_callable

    with pytest.raises(SystemExit):
        bench_ops.main(["--op", "layer_norm", "--device", "cpu", "--cuda-graph"])
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        time_callable(lambda: None, "cpu", cuda_graph=True)


class _CompileError(Exception):
    """Like Triton's CompilationError / OutOfResources: an Exception, not a RuntimeError."""


@pytest.mark.parametrize("error", [RuntimeError, _CompileError])
def test_a_failing_provider_costs_only_its_own_rows(tmp_path, monkeypatch, capsys, error):
    """On a lent GPU one op that fails must not lose the others' rows: the rest are timed and
    written, then the run exits non-zero naming what failed."""
    import tec_fast.ops.reference as reference

    def broken(*args, **kwargs):
        raise error("planted failure")
    monkeypatch.setattr(reference, "layer_norm", broken)
    with pytest.raises(SystemExit, match=rf"layer_norm_fwd reference: {error.__name__}: planted failure"):
        bench_ops.main(["--op", "all", "--device", "cpu", "--reps", "1", "--warmup", "0",
                        "--results-dir", str(tmp_path)])
    benches = {r["bench"] for r in _rows(tmp_path)}
    assert "layer_norm_fwd" not in benches and {"masked_gather_fwd", "mlp_fwdbwd", "patch_embed_fwd"} <= benches
    assert "layer_norm_fwdbwd reference: FAILED" in capsys.readouterr().out


def test_rows_are_written_op_by_op(tmp_path, monkeypatch):
    """A run stopped part way (a lent GPU's stage cap kills it) keeps the rows of the ops it finished."""
    import tec_fast.ops.reference as reference

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(reference, "scatter_masked", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench_ops.main(["--op", "all", "--device", "cpu", "--reps", "1", "--warmup", "0",
                        "--results-dir", str(tmp_path)])
    benches = {r["bench"] for r in _rows(tmp_path)}
    before = bench_ops.OPS[:bench_ops.OPS.index("scatter_masked")]
    assert before and {f"{op}_fwd" for op in before} <= benches and "scatter_masked_fwd" not in benches
