"""CUDA-graph steps on CPU: capture_step's and fit's argument checks, and fit's graph path with
the recording emulated (the real recording runs in tests/test_step_gpu.py)."""
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

    cfg = FitConfig(accum=2, precision="fp16", compile=True, cuda_graph=True)
    variable = type("Objective", (), {"variable": True, "cache": object()})()
    reasons = graph_reasons(cfg, torch.device("cpu"), 2, "apex.optimizers.FusedAdam (adam_w_mode)", True, variable)
    for words in ("CUDA device", "one process", "accum 1", "fp16", "fused AdamW", "fixed size", "compile",
                  "one fixed mask ratio", "TargetCache"):
        assert any(words in r for r in reasons), (words, reasons)
    ok = FitConfig(cuda_graph=True, precision="bf16")
    assert graph_reasons(ok, torch.device("cuda"), 1, "torch.optim.AdamW (fused)", False) == []


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


class _EmulatedGraph:
    """A recorded graph's stand-in on CPU: a replay runs the recorded function again and copies
    its results into the tensors the recording returned (as a replay refreshes them)."""

    def __init__(self, fn, out, before=None):
        self.fn, self.out, self.before, self.replays = fn, out, before, 0

    def pool(self):
        return None

    def replay(self):
        self.replays += 1
        if self.before is not None:
            self.before()
        for static, new in zip(_tensors(self.out), _tensors(self.fn())):
            static.copy_(new)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _emulated_step_class():
    import copy

    from tec_fast.training.graphed import GraphedStep

    class EmulatedStep(GraphedStep):
        """GraphedStep with the recording emulated on CPU: recording runs the function on a
        snapshot of the weights and optimizer state and restores them (a real recording runs
        nothing); replays run it again. Everything else is fit's own graph path."""
        instances = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for group in self.optimizer.param_groups:
                group["capturable"] = False  # torch's AdamW records on GPUs only
            EmulatedStep.instances.append(self)

        def _warm_up(self, fn):
            self.optimizer.zero_grad(set_to_none=True)
            fn()

        def _record(self, fn, pool=None):
            saved = copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict())
            out = fn()
            self.model.load_state_dict(saved[0])
            self.optimizer.load_state_dict(saved[1])
            fresh_grads = (lambda: self.optimizer.zero_grad(set_to_none=True)) if fn == self._forward_backward else None
            return _EmulatedGraph(fn, out, fresh_grads), out

    return EmulatedStep


def test_fit_graph_path_trains_as_eager_with_recording_emulated(monkeypatch):
    """fit's cuda_graph wiring on CPU: first step eager, the recording at the second, replays
    after it (batches and noise copied into the recorded inputs, the lr written into its tensor,
    clipping's norm read back). Against an eager run whose optimizer also holds its lr in a
    tensor, the result is bitwise the same. (With a Python-float lr the last bit of an update
    differs, and parameters with no true gradient, such as attention key biases, then take
    Adam steps of up to the lr on different rounding noise.)"""
    from torch.utils.data import TensorDataset

    import tec_fast.training.loop as loop
    from tec_fast.training import FitConfig, fit
    from train_helpers import tiny_objective, tiny_tec

    data = TensorDataset(torch.randn(24, 3, 16, 16), torch.zeros(24, dtype=torch.long))
    common = dict(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=2, clip_grad=0.5, progress=False, seed=0)
    build = loop.build_optimizer

    def tensor_lr(*args, **kwargs):
        opt, name = build(*args, **kwargs)
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]))
        return opt, name

    monkeypatch.setattr(loop, "build_optimizer", tensor_lr)
    eager = fit(tiny_tec(), tiny_objective(), data, FitConfig(**common))
    monkeypatch.setattr(loop, "build_optimizer", build)

    step_class = _emulated_step_class()
    monkeypatch.setattr(loop, "GraphedStep", step_class)
    monkeypatch.setattr(loop, "graph_reasons", lambda *a, **k: [])
    graphed = fit(tiny_tec(), tiny_objective(), data, FitConfig(cuda_graph=True, **common))

    (step,) = step_class.instances
    assert step.recorded and step.fwd_bwd.replays == 5 and step.opt_step.replays == 5  # step 1 eager
    lr = step.optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.item() == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert graphed.losses == eager.losses and graphed.metrics == eager.metrics  # grad_norm included
    for (name, p), q in zip(graphed.model.named_parameters(), eager.model.parameters()):
        assert torch.equal(p, q), name
