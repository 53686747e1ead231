"""Dispatch: the kernel mode is read once, decisions are cached, ``triton`` forces the kernels or
fails naming the op, and ``auto`` on a GPU follows the measured table of its class."""
import json
import os
from unittest import mock

import pytest
import torch

from tec_fast import ops
from tec_fast.ops import dispatch


@pytest.fixture
def fresh_settings():
    dispatch.reload_environment()
    yield
    dispatch.reload_environment()
    dispatch.load_tables()


def test_mode_is_read_once_and_set_explicitly(fresh_settings):
    with mock.patch.dict(os.environ, {"TEC_FAST_KERNELS": "reference"}):
        assert dispatch.kernel_mode() == "reference"
        os.environ["TEC_FAST_KERNELS"] = "triton"  # no re-read per call ...
        assert dispatch.kernel_mode() == "reference"
        dispatch.reload_environment()  # ... until asked
        assert dispatch.kernel_mode() == "triton"
    dispatch.set_kernel_mode("reference")
    assert dispatch.kernel_mode() == "reference"
    with pytest.raises(ValueError, match="kernel mode must be one of"):
        dispatch.set_kernel_mode("fast")


def test_decisions_are_cached_per_shape(fresh_settings):
    dispatch.set_kernel_mode("reference")
    x = torch.randn(2, 3, 8)
    n = len(dispatch._DECISIONS)
    assert ops.why_not_fast("layer_norm", x) == ["TEC_FAST_KERNELS=reference"]
    assert ops.why_not_fast("layer_norm", torch.randn(2, 3, 8)) == ["TEC_FAST_KERNELS=reference"]
    assert len(dispatch._DECISIONS) == n + 1
    ops.why_not_fast("layer_norm", torch.randn(2, 4, 8))
    assert len(dispatch._DECISIONS) == n + 2
    dispatch.set_kernel_mode("auto")  # a new mode forgets them
    assert not dispatch._DECISIONS


def test_triton_mode_fails_where_it_cannot_run(fresh_settings):
    dispatch.set_kernel_mode("triton")
    dispatch._SETTINGS["interpret"] = False  # a CPU tensor without the interpreter
    x, w, b = torch.randn(2, 5, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="TEC_FAST_KERNELS=triton but layer_norm cannot .*TRITON_INTERPRET"):
        ops.layer_norm(x, w, b)
    dispatch.set_kernel_mode("auto")  # auto: the reference, quietly
    dispatch._SETTINGS["interpret"] = False
    torch.testing.assert_close(ops.layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (8,), w, b, 1e-6))


def test_torch_func_transforms_take_the_reference(triton_path):
    """Inside torch.func.grad / vmap the kernels' autograd.Functions cannot run (no setup_context):
    the decision says so per call, a forced Triton path fails naming it, and the same call
    outside a transform (same shape, a cached decision) still takes the kernels."""
    x, ids = torch.randn(2, 7, 5), torch.tensor([[0, 3, 6], [1, 2, 5]])
    seen = []
    torch.func.vmap(lambda t: seen.append(dispatch.why_not_fast("masked_gather", t)) or t)(torch.stack([x, x]))
    assert any("torch.func" in r for r in seen[0])
    with pytest.raises(RuntimeError, match="masked_gather cannot run .*inside a torch.func transform"):
        torch.func.grad(lambda t: ops.masked_gather(t, ids).sum())(x)
    assert dispatch.why_not_fast("masked_gather", x) == []
    dispatch.set_kernel_mode("reference")
    want = torch.zeros_like(x)
    want[torch.arange(2)[:, None], ids] = 1.0
    torch.testing.assert_close(torch.func.grad(lambda t: ops.masked_gather(t, ids).sum())(x), want)


def test_cuda_tensor_off_the_current_device_is_not_launched(fresh_settings):
    """A Triton launch runs on the current CUDA device: a tensor on another one takes the
    reference under auto (with the reason), and fails naming the fix under triton; checked per
    call, since the current device changes without the cached decision knowing."""
    from types import SimpleNamespace
    t = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1), dtype=torch.bfloat16, shape=(2, 5, 8))
    dispatch.set_kernel_mode("triton")
    with mock.patch.object(torch.cuda, "current_device", return_value=1):
        assert dispatch.use_fast_path("layer_norm", t) and not ops.why_not_fast("layer_norm", t)
    with mock.patch.object(torch.cuda, "current_device", return_value=0):
        (reason,) = ops.why_not_fast("layer_norm", t)
        assert reason.startswith("tensor on cuda:1 while the current CUDA device is cuda:0") \
            and "torch.cuda.set_device(1)" in reason
        with pytest.raises(RuntimeError, match=r"TEC_FAST_KERNELS=triton but layer_norm cannot .*set_device\(1\)"):
            dispatch.use_fast_path("layer_norm", t)
    with mock.patch.object(torch.cuda, "current_device", return_value=1):  # current again: taken
        assert dispatch.use_fast_path("layer_norm", t)


def _bench_rows(op, fwd, fwdbwd, device="NVIDIA_TestGPU"):
    rows = []
    for pss, speedup in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        for provider, ms in (("reference", 1.0), ("triton", 1.0 / speedup)):
            rows.append(dict(bench=f"{op}_{pss}", provider=provider, shape="B=4", dtype="bf16", median_ms=ms,
                             commit="abc1234", timestamp="2026-12-01T00:00:00+00:00", device=device))
    return rows


def test_auto_follows_the_measured_table(tmp_path, fresh_settings):
    from benchmarks.dispatch_table import build_table
    rows = _bench_rows("masked_gather", 4.0, 0.5) + _bench_rows("relation_loss", 2.0, 1.25)
    rows += [r for r in _bench_rows("layer_norm", 3.0, 3.0) + _bench_rows("relation_targets", 2.0, 2.0)
             if r["bench"].endswith("_fwd")]  # forward alone measured
    table = build_table(rows, list(ops.OPS))
    assert table["masked_gather"]["fwdbwd"]["speedup"] == 0.5
    (tmp_path / "TestGPU.json").write_text(json.dumps(dict(gpu_class="TestGPU", ops=table)))
    dispatch.load_tables(str(tmp_path))
    dispatch.set_kernel_mode("auto")
    train = dispatch.dispatch_report("cuda", gpu="TestGPU", backward=True)
    infer = dispatch.dispatch_report("cuda", gpu="TestGPU", backward=False)
    assert train["relation_loss"][0] == "triton" and infer["relation_loss"][0] == "triton"
    assert infer["masked_gather"][0] == "triton"  # forward alone wins ...
    backend, reasons = train["masked_gather"]  # ... forward + backward loses
    assert backend == "reference" and "measured 0.50x the reference on TestGPU" in reasons[0]
    # a forward-only measurement decides in grad mode only for an op without a backward
    assert "layer_norm forward + backward not measured on TestGPU" in train["layer_norm"][1][0]
    assert infer["layer_norm"][0] == "triton"
    assert train["relation_targets"][0] == "triton" and infer["relation_targets"][0] == "triton"
    assert "not measured on TestGPU" in train["mlp"][1][0]
    other = dispatch.dispatch_report("cuda", gpu="OtherGPU")
    assert all(b == "reference" for b, _ in other.values())
    assert "OtherGPU is unmeasured" in other["relation_loss"][1][0]
    assert dispatch.measured_report("cuda", gpu="TestGPU")["masked_gather"]["fwd"]["speedup"] == 4.0


def test_committed_h200_table_matches_its_rows():
    """tec_fast/ops/measured/H200.json is what benchmarks/dispatch_table.py writes from the
    committed H200 rows (it cannot drift from its source)."""
    from benchmarks.common import REPO
    from benchmarks.dispatch_table import build_table, read_rows
    committed = json.load(open(os.path.join(dispatch.MEASURED_DIR, "H200.json")))
    rows = read_rows(os.path.join(REPO, committed["source"]))
    assert build_table(rows, list(ops.OPS), committed["dtype"]) == committed["ops"]
    assert dispatch.gpu_class("NVIDIA H200") == "H200" and dispatch.gpu_class("NVIDIA H100 80GB HBM3") == "H100"


@pytest.mark.parametrize("name, cls", [("NVIDIA GH200 480GB", "GH200"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"),
                                       ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A10", "A10"),
                                       ("NVIDIA H100 PCIe", "H100"), ("Tesla T4", "Tesla_T4")])
def test_gpu_class_matches_whole_words(name, cls):
    """A class is a whole word of the device name: a GH200 is not an H200, an L40S not an L4."""
    assert dispatch.gpu_class(name) == cls


def test_dispatch_table_cli_errors(tmp_path, capsys):
    from benchmarks import dispatch_table
    with pytest.raises(SystemExit) as e:
        dispatch_table.main(["--results", str(tmp_path / "none.jsonl")])
    assert e.value.code == 2 and "error: --results: no file" in capsys.readouterr().err
    empty = tmp_path / "rows.jsonl"
    empty.write_text(json.dumps(dict(bench="step", provider="engine", device="NVIDIA_H200")) + "\n")
    with pytest.raises(SystemExit) as e:
        dispatch_table.main(["--results", str(empty), "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "holds no bench_ops rows" in capsys.readouterr().err
    rows = tmp_path / "ok.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in _bench_rows("mlp", 1.5, 0.9)))
    assert dispatch_table.main(["--results", str(rows), "--out-dir", str(tmp_path)]) == 0
    written = json.load(open(tmp_path / "NVIDIA_TestGPU.json"))  # an unknown name is its own class
    assert written["gpu_class"] == "NVIDIA_TestGPU" and written["ops"]["mlp"]["fwdbwd"]["speedup"] == 0.9
