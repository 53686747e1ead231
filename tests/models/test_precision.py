"""The frozen base under autocast (tec_fast/training/precision.py): ``autocast_copy`` stores its
GEMM weights in the autocast dtype once, computes bitwise the targets the fp32 base computes under
the same autocast (reference path and Triton path), skips the per-step weight casts, leaves the
original alone, and ``fit`` hands a bf16 run's TEC objective such a copy."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from tec_fast import BaseModel, ViTConfig
from tec_fast.training import FitConfig, fit
from tec_fast.training.objectives import TECObjective
from tec_fast.training.precision import CastWeightsOnce, autocast_copy
from train_helpers import AugmentedImages, tiny_base, tiny_objective, tiny_tec


def _base(seed=0) -> BaseModel:
    """A tiny base with every parameter random (biases and norms too), so that a skipped or an
    extra rounding anywhere shows."""
    torch.manual_seed(seed)
    base = BaseModel(ViTConfig(img_size=24, patch_size=4, embed_dim=48, depth=3, num_heads=3), topk=5)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return base


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _targets(base, images):
    with torch.autocast("cpu", dtype=torch.bfloat16), _Ops() as ops:
        t = base(images)
    return t, ops.counts.get("aten._to_copy", 0)


def test_copy_has_bf16_gemm_weights_and_leaves_the_original():
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    low = autocast_copy(base, torch.bfloat16)
    for name, p in low.named_parameters():
        is_gemm = name.startswith(("patch_embed.proj.", "blocks.")) and (".qkv." in name or ".proj." in name
                                                                       or ".fc1." in name or ".fc2." in name
                                                                       or name.startswith("patch_embed"))
        assert p.dtype == (torch.bfloat16 if is_gemm else torch.float32), name
        assert not p.requires_grad
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in base.state_dict().items())
    assert low.topk == base.topk and not low.training


def test_refuses_trainable_modules_and_other_dtypes():
    with pytest.raises(ValueError, match="must be frozen.*'weight'"):
        autocast_copy(nn.Linear(4, 4), torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        autocast_copy(_base(), torch.float32)


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
def test_same_targets_as_the_fp32_base_under_autocast_with_fewer_casts(request, path):
    request.getfixturevalue(path)
    base = _base()
    images = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    want, casts_fp32 = _targets(base, images)
    got, casts_low = _targets(autocast_copy(base, torch.bfloat16), images)
    for name in ("features", "relation", "topk_idx"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # the copy skips the casts of every GEMM layer's weight and bias: four per block, and the
    # patch embedding (what is left: the small tokens, the position table, the fp32 features).
    # On the Triton path the blocks (``vit_blocks``, the one whose q, k the relation targets need
    # included) cast their weights in registers: no block had casts to skip.
    cast_blocks = len(base.blocks) if path == "reference_path" else 0
    assert casts_fp32 - casts_low == 2 * (4 * cast_blocks + 1), (casts_fp32, casts_low)


def test_for_precision_gives_a_bf16_run_a_copy_and_leaves_the_objective_alone():
    base = _base()
    objective = TECObjective(base, 0.75, base.config.num_patches)
    low = objective.for_precision(torch.bfloat16)
    assert low is not objective and objective.base is base  # the objective given: unchanged
    assert low.base is not base and low.base.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert base.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert (low.mask_ratio, low.noise_columns) == (objective.mask_ratio, objective.noise_columns)
    assert objective.for_precision(None) is objective  # fp32: the objective itself

    calls = []
    objective = tiny_objective()

    class Recording(TECObjective):
        def __call__(self, model, batch, noise):
            calls.append((self, self.base))
            return super().__call__(model, batch, noise)

    recording = Recording(objective.base, 0.75, objective.patches)
    cfg = FitConfig(epochs=1, batch_size=8, lr=1e-3, warmup_steps=1, progress=False, seed=0, precision="bf16")
    fit(tiny_tec(), recording, AugmentedImages(n=16), cfg)
    # every step ran one copy with the bf16 base; the objective given was never changed
    assert calls and all(obj is calls[0][0] and b is calls[0][1] for obj, b in calls)
    assert calls[0][0] is not recording and calls[0][1].blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert recording.base is objective.base and recording.base.blocks[0].mlp.fc1.weight.dtype == torch.float32


def test_cast_weights_once_never_changes_the_model():
    """The wrapper runs its own structural copy: while a step runs, the model's layers still hold
    their fp32 Parameters (hooks registered on the model fire, seeing the copy's cast weights)."""
    model = tiny_tec()
    wrapped = CastWeightsOnce(model, torch.bfloat16)
    attn = model.blocks[0].attn
    seen = []
    attn.register_forward_pre_hook(lambda module, args: seen.append(
        (type(attn.qkv.weight), attn.qkv.weight.dtype, module is attn, module.qkv.weight.dtype)))
    params = {n: p for n, p in model.named_parameters()}
    images = torch.randn(2, 3, 16, 16)
    targets = tiny_base()(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped(images, targets, mask_ratio=0.75)["loss"].backward()
    assert seen == [(nn.Parameter, torch.float32, False, torch.bfloat16)]
    assert all(p is params[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
    assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.dtype == torch.float32
    assert set(wrapped.state_dict()) == {"module." + k for k in model.state_dict()}  # no second copy
    wrapped.eval()
    assert not model.training and not wrapped.runner.training
    assert wrapped.runner.blocks[0].attn.qkv.weight is attn.qkv.weight  # at rest: the same Parameter


def _tec_step(wrap: bool):
    """One TEC loss + backward under CPU bf16 autocast on a tiny model with every parameter
    random; (loss, gradients by name, casts, multi-tensor copies)."""
    torch.manual_seed(0)
    model = tiny_tec()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base = tiny_base()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    noise = torch.rand(4, model.config.encoder.num_patches, generator=torch.Generator().manual_seed(4))
    m = CastWeightsOnce(model, torch.bfloat16) if wrap else model
    with torch.autocast("cpu", dtype=torch.bfloat16), _Ops() as ops:
        targets = base(images)
        out = m(images, targets, mask_ratio=0.75, noise=noise)
        out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters()}, ops


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
def test_cast_weights_once_is_bitwise_autocast_with_two_multi_tensor_copies(request, path):
    request.getfixturevalue(path)
    loss0, grads0, ops0 = _tec_step(False)
    loss1, grads1, ops1 = _tec_step(True)
    assert torch.equal(loss0, loss1)
    for name, g in grads0.items():
        assert g is not None and grads1[name] is not None and g.dtype == torch.float32, name
        assert torch.equal(g, grads1[name]) and grads1[name].dtype == torch.float32, name
    weights = len(CastWeightsOnce(tiny_tec(), torch.bfloat16).names)
    assert weights >= 10
    assert ops1.counts.get("aten._foreach_copy_") == 2 and "aten._foreach_copy_" not in ops0.counts
    # one cast of each weight forward and of its gradient backward, gone (on the Triton path the
    # encoder adapter's op and each whole block cast their weights themselves, so fewer casts
    # were there to remove: the embeddings', the heads', the decoders')
    removed = ops0.counts["aten._to_copy"] - ops1.counts["aten._to_copy"]
    assert removed == 2 * weights if path == "reference_path" else 0 < removed < 2 * weights, (removed, weights)


def test_cast_weights_once_passes_through_without_autocast_or_grad():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    wrapped = CastWeightsOnce(model, torch.bfloat16)
    assert wrapped.names == ["0.weight", "2.weight"]
    x = torch.randn(3, 4)
    with _Ops() as ops:
        assert torch.equal(wrapped(x), model(x))                      # no autocast
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(wrapped(x), model(x))                  # no grad
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.equal(wrapped(x), model(x))                  # another autocast dtype
    assert "aten._foreach_copy_" not in ops.counts
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        CastWeightsOnce(model, torch.float32)


def test_bf16_fit_trains_as_plain_autocast(monkeypatch, tmp_path):
    """fit with bf16 wraps the model (one process); the losses and the trained weights are
    bitwise those of the same run with the wrapper switched off."""
    from tec_fast.training import loop

    def run():
        cfg = FitConfig(epochs=2, batch_size=8, lr=1e-3, warmup_steps=1, progress=False, seed=0,
                        precision="bf16")
        r = fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), cfg)
        return r.losses, r.model.state_dict()

    wrapped = []
    monkeypatch.setattr(loop, "CastWeightsOnce", lambda m, dt: wrapped.append(dt) or CastWeightsOnce(m, dt))
    losses1, state1 = run()
    assert wrapped == [torch.bfloat16]
    monkeypatch.setattr(loop, "CastWeightsOnce", lambda m, dt: m)
    losses0, state0 = run()
    assert losses1 == losses0
    assert all(torch.equal(state0[k], state1[k]) for k in state0)


@pytest.mark.gpu
def test_gpu_step_is_bitwise_plain_autocast(cuda_triton_path):
    """On the GPU (compiled kernels, cuBLAS, CUDA's multi-tensor copy between dtypes): the tiny
    TEC step with the base as ``autocast_copy`` and the model wrapped, against plain autocast:
    the same loss and gradients (up to the last bits an atomic or split-K reduction order may
    change between two runs)."""
    def step(fast: bool):
        torch.manual_seed(0)
        model, base = tiny_tec().cuda(), tiny_base().cuda()
        images = torch.randn(8, 3, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
        noise = torch.rand(8, model.config.encoder.num_patches, device="cuda",
                           generator=torch.Generator("cuda").manual_seed(4))
        if fast:
            base, call = autocast_copy(base, torch.bfloat16), CastWeightsOnce(model, torch.bfloat16)
        else:
            call = model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = call(images, base(images), mask_ratio=0.75, noise=noise)
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters()}

    loss0, grads0 = step(False)
    loss1, grads1 = step(True)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for name, g in grads0.items():
        assert grads1[name].dtype == torch.float32, name
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)
