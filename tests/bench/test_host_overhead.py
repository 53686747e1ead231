"""benchmarks/host_overhead.py: Triton launches recorded and skipped, rows well formed. Never a
speed threshold (the numbers are measurements, not assertions)."""
import json
import os

import pytest

from benchmarks import host_overhead
from benchmarks.triton_stub import launches_stubbed
from conftest import env_without_interpreter, ptxas_or_skip


def _interpreter_or_skip():
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("TRITON_INTERPRET is off: the Triton path cannot take CPU tensors")


def test_stub_records_and_restores():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    before = (JITFunction.__dict__["run"], InterpretedFunction.__dict__["run"])
    seen = []
    with launches_stubbed(lambda name, args, kwargs: seen.append(name)):
        import torch

        from tec_fast.kernels.mlp import _mlp_gelu_fwd
        out = _mlp_gelu_fwd(torch.full((2, 8), 3.0))  # the kernel is skipped: out is never written
    assert seen == ["_mlp_gelu_fwd_kernel"] and out.shape == (2, 8)
    assert (JITFunction.__dict__["run"], InterpretedFunction.__dict__["run"]) == before


def test_ops_table_rows(tmp_path, capsys):
    _interpreter_or_skip()
    out = tmp_path / "host.jsonl"
    assert host_overhead.main(["--skip-step", "--ops", "layer_norm,relation_targets", "--calls", "2",
                               "--reps", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["op"], r["provider"]) for r in rows} == {(op, p) for op in ("layer_norm", "relation_targets")
                                                        for p in ("triton", "reference")}
    for r in rows:
        for key in ("device", "commit", "torch", "triton", "timestamp", "fwd_us", "shape", "threads"):
            assert key in r, key
        assert r["fwd_us"] > 0
        # a subset at 1 repetition: recorded as such, and left out of the README's table
        assert (r["full_run"], r["reps"], r["calls"]) == (False, 1, 2)
    by = {(r["op"], r["provider"]): r for r in rows}
    # backward: the row kernel and the weight / bias partial-sum kernel
    assert by["layer_norm", "triton"]["fwd_launches"] == 1 and by["layer_norm", "triton"]["bwd_launches"] == 2
    assert by["layer_norm", "reference"]["fwd_launches"] == 0
    assert by["relation_targets", "triton"]["fwd_launches"] == 2  # ranking + rows kernels
    assert by["relation_targets", "triton"]["bwd_us"] is None  # no gradient
    assert "fwd_vs_reference" in capsys.readouterr().out


def test_step_table(tmp_path):
    _interpreter_or_skip()
    out = tmp_path / "host.jsonl"
    assert host_overhead.main(["--skip-ops", "--steps", "1", "--reps", "1", "--out", str(out)]) == 0
    rows = {r["provider"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"engine", "eager"}
    assert rows["engine"]["triton_launches"] > 0 and rows["eager"]["triton_launches"] == 0
    assert rows["eager"]["vs_eager"] == 1.0 and rows["engine"]["host_ms"] > 0
    assert rows["engine"]["torch_ops"] > 0 and rows["eager"]["torch_ops"] > 0


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        host_overhead.main(["--ops", "nope"])
    assert e.value.code == 2 and "--ops: unknown ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        host_overhead.main(["--reps", "0"])
    assert e.value.code == 2 and "argument --reps: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        host_overhead.main(["--skip-step", "--skip-ops"])
    assert e.value.code == 2 and "leaves nothing to measure" in capsys.readouterr().err


def _torch_calls(fn):
    return sorted(host_overhead.torch_ops(fn).elements())


def test_inference_calls_issue_few_torch_ops(triton_path):
    """Without a gradient (the frozen base's 12 blocks a step) each op allocates only what it
    returns and projects with one ``F.linear``: layer_norm no statistics (and no h without a
    residual), mlp and qkv_heads no reshape / t / addmm / view triples. Counted, not timed."""
    import torch

    from tec_fast import ops
    torch.manual_seed(0)
    x, res = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    w, b = torch.randn(32), torch.randn(32)
    w1, b1, w2, b2 = torch.randn(64, 32), torch.randn(64), torch.randn(32, 64), torch.randn(32)
    wq, bq = torch.randn(96, 32), torch.randn(96)
    with torch.no_grad(), launches_stubbed(lambda *a: None):
        ops.layer_norm(x, w, b)  # warm the dispatch decisions and launch configurations
        assert _torch_calls(lambda: ops.layer_norm(x, w, b)) == ["aten::empty_like"]
        ops.layer_norm(x, w, b, residual=res)
        assert _torch_calls(lambda: ops.layer_norm(x, w, b, residual=res)) == ["aten::empty_like"] * 2
        ops.mlp(x, w1, b1, w2, b2)
        assert _torch_calls(lambda: ops.mlp(x, w1, b1, w2, b2)) == ["aten::empty_like", "aten::linear",
                                                                    "aten::linear"]
        ops.qkv_heads(x, wq, bq, 2)
        assert _torch_calls(lambda: ops.qkv_heads(x, wq, bq, 2)) == ["aten::linear", "aten::permute",
                                                                     "aten::unbind", "aten::view"]


def test_launch_path_goes_through_tritons_own_launch(tmp_path):
    """``--launch-path``: the interpreter off, each kernel compiled once for sm_90 offline, every
    launch through ``JITFunction.run`` up to the driver call (counted there). A subprocess: the
    kernels of this process were defined under the interpreter."""
    import subprocess
    import sys
    ptxas_or_skip(90)
    out = tmp_path / "host.jsonl"
    env = env_without_interpreter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--launch-path", "--skip-step",
                           "--ops", "layer_norm", "--calls", "2", "--reps", "1", "--out", str(out)],
                          cwd=host_overhead.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["provider"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["triton"]["launch_path"] is True
    assert rows["triton"]["fwd_launches"] == 1 and rows["triton"]["bwd_launches"] == 2
    assert rows["reference"]["fwd_launches"] == 0 and rows["triton"]["fwd_us"] > 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # under the interpreter: refused
        with pytest.raises(SystemExit) as e:
            host_overhead.main(["--launch-path", "--skip-step"])
        assert e.value.code == 2


def test_step_host_split_smoke(capsys):
    """``benchmarks.experiments.step_host_split``: one profiled step of each, the split printed."""
    _interpreter_or_skip()
    from benchmarks.experiments import step_host_split
    from tec_fast.ops import dispatch
    before = dispatch.kernel_mode()
    assert step_host_split.main(["--steps", "1"]) == 0
    assert dispatch.kernel_mode() == before  # the forced Triton mode does not outlive the run
    out = capsys.readouterr().out
    assert "compute_kernels_ms" in out and "engine" in out and "eager" in out
    with pytest.raises(SystemExit):
        step_host_split.main(["--steps", "0"])
    assert step_host_split.main(["--phases", "--steps", "1"]) == 0
    assert dispatch.kernel_mode() == before
    out = capsys.readouterr().out
    assert all(k in out for k in ("base_forward", "backward", "vs_eager_total", "engine", "eager"))


def test_block_routes_smoke(capsys, monkeypatch):
    """``benchmarks.experiments.block_routes``: one step of each route, each running what it says
    (the one-node block, torch's graph of the block, the separate ops); the kernel path and the
    op table are as before afterwards."""
    _interpreter_or_skip()
    from collections import Counter
    from benchmarks.experiments import block_routes
    from tec_fast.ops import dispatch, reference
    before, fast = dispatch.kernel_mode(), dispatch.fast_impl("vit_block")
    assert block_routes.main(["--reps", "1", "--steps", "1"]) == 0
    assert dispatch.kernel_mode() == before and dispatch.fast_impl("vit_block") is fast
    out = capsys.readouterr().out
    for route in (*block_routes.ROUTES, "eager"):
        assert route in out
    with pytest.raises(SystemExit):
        block_routes.main(["--reps", "0"])

    calls = Counter()

    def counted(name, fn):
        return lambda *a, **k: calls.update([name]) or fn(*a, **k)
    for op in ("vit_block", "mlp"):
        monkeypatch.setitem(dispatch._FAST, op, counted(op, dispatch._FAST[op]))
    kernels = dispatch._KERNELS["vit_block"]
    monkeypatch.setattr(kernels, "vit_blocks", counted("stack", kernels.vit_blocks))
    monkeypatch.setattr(reference, "vit_block", counted("torch block", reference.vit_block))
    dispatch.set_kernel_mode("triton")
    try:
        steps = block_routes.make_steps()
        seen = {}
        for route in block_routes.ROUTES:
            calls.clear()
            steps[route]()
            seen[route] = dict(calls)
    finally:
        dispatch.set_kernel_mode(before)
    one, per_block, on_torch, parts = (Counter(seen[r]) for r in block_routes.ROUTES)
    # the base's, the encoder's and the decoder's stacks; block by block, their 12 + 12 + 2 blocks
    # but the base's last (its q and k: part by part, as before the stack)
    assert one["stack"] == 3 and not one["vit_block"] and not one["torch block"], seen
    assert per_block["vit_block"] == 25 and not per_block["torch block"], seen
    assert on_torch["torch block"] == 25 and not on_torch["vit_block"] and not on_torch["stack"], seen
    assert not (parts["vit_block"] or parts["torch block"] or parts["stack"]) and parts["mlp"] >= one["mlp"] + 25, seen


@pytest.mark.parametrize("module, parts", [
    ("launch_path_split", ("JITFunction.run", "argument binder", "cache key", "rest of run")),
    ("layer_norm_split", ("tec_fast.ops.layer_norm", "plain torch", "autograd.Function, no work",
                          "launchers alone", "one reused launch")),
])
def test_offline_experiment_smoke(module, parts):
    """``benchmarks.experiments.<module>`` runs and prints its parts (the interpreter off: a
    subprocess)."""
    import subprocess
    import sys
    ptxas_or_skip(90)
    env = env_without_interpreter()
    done = subprocess.run([sys.executable, "-m", f"benchmarks.experiments.{module}", "--calls", "10"],
                          cwd=host_overhead.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for part in parts:
        assert part in done.stdout, part


def test_quiet_profile_silences_only_the_profilers_start_and_stop(tmp_path):
    """``benchmarks.common.quiet_profile``: no ``USDT`` lines from the profiler's start and stop,
    but what the profiled code writes to stderr (C++ or Python) still shows, and stderr is
    restored afterwards (a subprocess: fd 2 is what is checked)."""
    import subprocess
    import sys
    code = ("import os, sys, torch\n"
            "from torch.profiler import ProfilerActivity\n"
            "from benchmarks.common import quiet_profile\n"
            "with quiet_profile(activities=[ProfilerActivity.CPU]) as prof:\n"
            "    torch.ones(3).sum()\n"
            "    os.write(2, b'inside\\n')\n"
            "os.write(2, b'after\\n')\n"
            "assert any(e.name == 'aten::sum' for e in prof.events())\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=host_overhead.REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.split() == ["inside", "after"], done.stderr
