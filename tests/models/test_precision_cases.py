"""fp16 through the precision helpers (tec_fast/training/precision.py): ``autocast_copy`` and
``CastWeightsOnce`` take torch.float16 as they take bfloat16, bitwise plain autocast; the eval
mode reaches the wrapper's own copy of the module."""
from __future__ import annotations

import torch
import torch.nn as nn

from tec_fast.training.precision import CastWeightsOnce, autocast_copy


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.5), nn.Linear(8, 2))


def test_fp16_autocast_copy_is_bitwise_plain_autocast():
    base = _mlp().requires_grad_(False).eval()
    low = autocast_copy(base, torch.float16)
    assert low[0].weight.dtype == low[3].bias.dtype == torch.float16
    assert base[0].weight.dtype == torch.float32
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(low(x), base(x))


def test_fp16_cast_weights_once_is_bitwise_plain_autocast():
    model = _mlp(1).eval()
    wrapped = CastWeightsOnce(model, torch.float16)
    assert wrapped.names == ["0.weight", "3.weight"]
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        out, ref = wrapped(x), model(x)
    assert out.dtype == torch.float16 and torch.equal(out, ref)
    got = torch.autograd.grad(out.float().sum(), [model[0].weight, model[3].weight])
    want = torch.autograd.grad(ref.float().sum(), [model[0].weight, model[3].weight])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)


def test_eval_and_train_reach_the_wrappers_copy():
    model = _mlp(2)
    wrapped = CastWeightsOnce(model, torch.bfloat16)
    wrapped.eval()
    assert not model.training and not wrapped.runner.training
    assert not any(m.training for m in wrapped.runner.modules())
    x = torch.randn(64, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = wrapped(x), wrapped(x)  # dropout off: the same output twice
    assert torch.equal(a, b)
    wrapped.train()
    assert all(m.training for m in wrapped.runner.modules()) and model.training


def test_frozen_layers_are_left_to_autocast():
    """Only the weights being trained are cast in the wrapper's one kernel: a frozen layer's weight
    is cast by autocast as before, and gets no gradient."""
    model = _mlp(3).eval()
    model[0].requires_grad_(False)
    wrapped = CastWeightsOnce(model, torch.bfloat16)
    assert wrapped.names == ["3.weight"]
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = wrapped(x), model(x)
    assert torch.equal(out, ref)
    out.float().sum().backward()
    assert model[0].weight.grad is None and model[3].weight.grad is not None
