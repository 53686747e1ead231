"""CUDA-graph steps on CPU: capture_step's and fit's argument checks, and fit's graph path with
the recording emulated (the real recording runs in tests/training/test_step_gpu.py)."""
import math

import pytest
import torch

from tec_fast.training.cuda_graph import capture_step


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        capture_step(lambda: None, warmup=0)


def test_optimizer_must_be_capturable():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], capturable=False)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has capturable=False"):
        capture_step(lambda: None, opt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_needs_cuda():
    calls = []
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        capture_step(lambda: calls.append(1))
    assert not calls  # nothing ran


def test_fit_names_what_stands_in_the_way():
    from tec_fast.training import FitConfig
    from tec_fast.training.graphed import graph_reasons

    cfg = FitConfig(accum=2, precision="fp16", compile=True, cuda_graph=True, shard="fsdp")
    variable = type("Objective", (), {"variable": True, "cache": object()})()
    reasons = graph_reasons(cfg, torch.device("cpu"), 2, "apex.optimizers.FusedAdam (adam_w_mode)", True, variable)
    for words in ("CUDA device", "FSDP2", "fp16", "fused AdamW", "fixed size", "compile",
                  "one fixed mask ratio", "TargetCache"):
        assert any(words in r for r in reasons), (words, reasons)
    assert not any("accum" in r for r in reasons)  # accumulation is recorded too
    ok = FitConfig(cuda_graph=True, precision="bf16", accum=4)
    assert graph_reasons(ok, torch.device("cuda"), 1, "torch.optim.AdamW (fused)", False) == []
    assert graph_reasons(ok, torch.device("cuda"), 8, "torch.optim.AdamW (fused)", False) == []  # DDP
    assert graph_reasons(ok, torch.device("cuda"), 1, None, False) == []  # optimizer not judged yet


def test_fit_config_cuda_graph_modes():
    from tec_fast.training import FitConfig

    assert FitConfig().cuda_graph == "auto"
    assert FitConfig(cuda_graph=True).cuda_graph == "on" and FitConfig(cuda_graph=False).cuda_graph == "off"
    with pytest.raises(ValueError, match=r"FitConfig.cuda_graph must be 'auto', 'on' or 'off', got 'yes'"):
        FitConfig(cuda_graph="yes")


def test_plan_graphs_by_mode():
    from tec_fast.training import FitConfig
    from tec_fast.training.graphed import plan_graphs

    cpu, cuda, fused = torch.device("cpu"), torch.device("cuda"), "torch.optim.AdamW (fused)"
    assert plan_graphs(FitConfig(), cuda, 1, fused, False) == (True, "")
    use, why = plan_graphs(FitConfig(), cpu, 1, fused, False)
    assert not use and why.startswith("eager: it needs a CUDA device")
    use, why = plan_graphs(FitConfig(cuda_graph="off"), cuda, 1, fused, False)
    assert not use and "off" in why
    with pytest.raises(ValueError, match="cannot record this run's step: it needs a CUDA device"):
        plan_graphs(FitConfig(cuda_graph="on"), cpu, 1, fused, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_fit_refuses_cuda_graph_on_cpu():
    from torch.utils.data import TensorDataset

    from tec_fast.training import FitConfig, fit
    from train_helpers import tiny_objective, tiny_tec

    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="cuda_graph: cannot record this run's step: it needs a CUDA device"):
        fit(tiny_tec(), tiny_objective(), data, FitConfig(batch_size=4, max_steps=1, progress=False,
                                                           cuda_graph=True))


def test_set_lr_overwrites_a_tensor_lr_in_place():
    from tec_fast.training.optim import set_lr

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    opt.param_groups[0]["lr"] = lr = torch.tensor(1e-3)
    set_lr(opt, 5e-4)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(5e-4)
    plain = torch.optim.AdamW([p], lr=1e-3)
    set_lr(plain, 2e-4)
    assert plain.param_groups[0]["lr"] == 2e-4


def test_recorded_batch_shape_is_checked():
    from tec_fast.training.graphed import _clone, _copy_into

    static = _clone((torch.zeros(4, 3), {"m": torch.zeros(4)}))
    _copy_into(static, (torch.ones(4, 3), {"m": torch.ones(4)}))
    assert static[0].sum() == 12 and static[1]["m"].sum() == 4
    with pytest.raises(ValueError, match=r"shape \(3, 3\) does not fit the recorded shape \(4, 3\)"):
        _copy_into(static, (torch.ones(3, 3), {"m": torch.ones(4)}))
    with pytest.raises(TypeError, match="cannot hold a batch item of type str"):
        _clone(("a",))


def _as_if_on_cuda(monkeypatch):
    """fit plans graphs as on a CUDA device (CPU tensors stand in) and records with the emulation."""
    import tec_fast.training.loop as loop
    from graph_emulation import emulated_step_class

    step_class = emulated_step_class()
    monkeypatch.setattr(loop, "GraphedStep", step_class)
    real_plan = loop.plan_graphs
    monkeypatch.setattr(loop, "plan_graphs", lambda cfg, device, *a: real_plan(cfg, torch.device("cuda"), *a))
    return step_class


def _tensor_lr_eager(monkeypatch, data, **common):
    """The eager run to compare with: its optimizer holds the lr in a tensor too."""
    import tec_fast.training.loop as loop
    from tec_fast.training import FitConfig, fit
    from train_helpers import tiny_objective, tiny_tec

    build = loop.build_optimizer

    def tensor_lr(*args, **kwargs):
        opt, name = build(*args, **kwargs)
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]))
        return opt, name

    monkeypatch.setattr(loop, "build_optimizer", tensor_lr)
    try:
        return fit(tiny_tec(), tiny_objective(), data, FitConfig(cuda_graph="off", **common))
    finally:
        monkeypatch.setattr(loop, "build_optimizer", build)


@pytest.mark.parametrize("accum", [1, 2])
def test_fit_graph_path_trains_as_eager_with_recording_emulated(monkeypatch, accum):
    """fit's cuda_graph wiring on CPU: first step eager, the recording at the second, replays
    after it (batches and noise copied into the recorded inputs before each micro-step, the
    gradients added into tensors the optimizer graph zeroes, the lr written into its tensor,
    clipping's norm read back). Against an eager run whose optimizer also holds its lr in a
    tensor, the result is bitwise the same, with accumulation too. (With a Python-float lr the
    last bit of an update differs, and parameters with no true gradient, such as attention key
    biases, then take Adam steps of up to the lr on different rounding noise.)"""
    from torch.utils.data import TensorDataset

    from tec_fast.training import FitConfig, fit
    from train_helpers import tiny_objective, tiny_tec

    data = TensorDataset(torch.randn(48, 3, 16, 16), torch.zeros(48, dtype=torch.long))
    common = dict(max_steps=6, batch_size=4, accum=accum, lr=3e-3, warmup_steps=2, clip_grad=0.5,
                  progress=False, seed=0)
    eager = _tensor_lr_eager(monkeypatch, data, **common)
    step_class = _as_if_on_cuda(monkeypatch)
    graphed = fit(tiny_tec(), tiny_objective(), data, FitConfig(**common))  # the default: auto

    (step,) = step_class.instances
    assert step.recorded and step.fwd_bwd.replays == 5 * accum and step.opt_step.replays == 5  # step 1 eager
    assert graphed.cuda_graph == "replayed: 5 step(s) from CUDA graphs (the first 1 eager)"
    lr = step.optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.item() == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert graphed.losses == eager.losses and graphed.metrics == eager.metrics  # grad_norm included
    for (name, p), q in zip(graphed.model.named_parameters(), eager.model.parameters()):
        assert torch.equal(p, q), name


def test_failed_recording_falls_back_to_eager_in_auto_mode(monkeypatch):
    """cuda_graph='auto': a recording that fails (here: raises as a capture error would) leaves
    the run eager from that step on, with the reason in the result; 'on' raises it."""
    from torch.utils.data import TensorDataset

    from tec_fast.training import FitConfig, fit
    from train_helpers import tiny_objective, tiny_tec

    data = TensorDataset(torch.randn(24, 3, 16, 16), torch.zeros(24, dtype=torch.long))
    common = dict(max_steps=4, batch_size=4, lr=3e-3, warmup_steps=2, progress=False, seed=0)
    eager = fit(tiny_tec(), tiny_objective(), data, FitConfig(cuda_graph="off", **common))
    assert eager.cuda_graph.startswith("off")
    step_class = _as_if_on_cuda(monkeypatch)

    def broken(self, fn, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")
    monkeypatch.setattr(step_class, "_record", broken)
    fell_back = fit(tiny_tec(), tiny_objective(), data, FitConfig(**common))
    assert fell_back.cuda_graph == ("eager: the recording failed (RuntimeError: operation not permitted "
                                    "when stream is capturing)")
    # the same steps; the fallback keeps the learning rate as a tensor (the recording set it up),
    # eager a float: AdamW's update can round one ulp apart with some data
    assert fell_back.losses == pytest.approx(eager.losses, rel=1e-6, abs=1e-7)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        fit(tiny_tec(), tiny_objective(), data, FitConfig(cuda_graph="on", **common))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given without CUDA")
def test_auto_mode_on_cpu_says_why_it_stays_eager(tmp_path):
    import json

    from torch.utils.data import TensorDataset

    from tec_fast.training import FitConfig, fit
    from train_helpers import tiny_objective, tiny_tec

    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    r = fit(tiny_tec(), tiny_objective(), data, FitConfig(batch_size=4, max_steps=1, progress=False,
                                                           output_dir=str(tmp_path)))
    assert r.cuda_graph == "eager: it needs a CUDA device (training runs on cpu)"
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["cuda_graph"] == r.cuda_graph and events[-1]["cuda_graph"] == r.cuda_graph


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_graph_path_matches_one_process(tmp_path, accum):
    """Two processes (gloo) on the graph path, the recording emulated, two eager steps, then the
    replays: DDP with static_graph (accum 1), or the no_sync micro-step and the all-reducing one
    (accum 2). The losses of one eager process with the same global batch."""
    import json
    import os
    import subprocess
    import sys

    from tec_fast.training import FitConfig, fit
    from train_helpers import AugmentedImages, tiny_objective, tiny_tec

    here = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "rank0.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(here, "graph_ddp_worker.py"), str(out), str(4 // accum), str(accum)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    first = ""
    if proc.returncode != 0:  # a crashed gloo launch or teardown on a loaded machine: retried once
        first = f"first try (exit {proc.returncode}):\n{proc.stderr[-3000:]}\nsecond try:\n"
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, first + proc.stdout[-2000:] + proc.stderr[-4000:]
    two = json.loads(out.read_text())
    torch.set_num_threads(1)
    one = fit(tiny_tec(), tiny_objective(), AugmentedImages(n=32),
              FitConfig(name="ddp", epochs=2, batch_size=8 // accum, accum=accum, lr=2e-3, warmup_steps=2, seed=3,
                        progress=False, log_every=1, cuda_graph="off"))
    assert len(two["losses"]) == len(one.losses) == 8
    assert two["replays"] == 6 and two["local_replays"] == 6 * (accum - 1)
    assert two["status"].startswith("replayed: 6")
    assert two["losses"] == pytest.approx(one.losses, rel=1e-5)


def test_checkpoints_of_a_graphed_run_hold_plain_optimizer_groups():
    """A graphed run's optimizer keeps its lr in a device tensor with capturable=True; what it
    saves is a float lr and capturable=False, which an eager run on any device loads."""
    from tec_fast.training.graphed import GraphedStep

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    GraphedStep(model, model, None, opt, None, None, torch.device("cpu"))
    assert torch.is_tensor(opt.param_groups[0]["lr"]) and opt.param_groups[0]["capturable"]
    group = opt.state_dict()["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-3) and not torch.is_tensor(group["lr"]) and not group["capturable"]
    eager = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    eager.load_state_dict(opt.state_dict())
    assert eager.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_train_summary_says_whether_steps_replayed():
    from types import SimpleNamespace

    from tec_fast.cli.train import summary
    from tec_fast.training.config import FitResult

    result = FitResult(model=None, steps=3, total_steps=3, epoch=0, seconds=1.0, img_per_s=10.0, losses=[1.0],
                       metrics={"loss": 1.0}, stopped="completed", checkpoint=None, optimizer="adamw", lr=1e-3,
                       global_batch=4, cuda_graph="eager: it needs a CUDA device (training runs on cpu)")
    text = summary(SimpleNamespace(objective="tec"), result, "fp32", 1, None)
    assert "CUDA graph" in text and "eager: it needs a CUDA device (training runs on cpu)" in text


def test_bench_step_fit_graph_provider_runs_with_recording_emulated():
    """bench_step's engine_fit_graph provider (the step as fit replays it by default) on CPU."""
    from graph_emulation import emulated_step_class

    from benchmarks import bench_step

    bvit, cfg, topk = bench_step.build("tiny", torch.device("cpu"))
    images = torch.randn(2, 3, bvit.img_size, bvit.img_size)
    step_class = emulated_step_class()
    step = bench_step.engine_fit_graph_step_fn(bvit, cfg, topk, images, "fp32", 0.75, graphed_step=step_class)
    step()
    step()
    (graphed,) = step_class.instances
    assert graphed.fwd_bwd.replays == 2 and graphed.opt_step.replays == 2 and graphed.replays == 2
    with pytest.raises(ValueError, match="bf16 or fp32"):
        bench_step.engine_fit_graph_step_fn(bvit, cfg, topk, images, "fp16", 0.75, graphed_step=step_class)
