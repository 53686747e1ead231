"""Packed attention on torch's flash varlen kernel and the packed training step on CUDA (run
whenever a GPU is lent; on CPU the packed step's no-read-back check is in test_packed_model.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tec_fast.ops.attention import packed_attention, packed_attention_backend

pytestmark = pytest.mark.gpu

LENS = [1, 17, 50, 3, 64, 29]  # awkward lengths, one of 1


def _flash_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def _per_image(q, k, v, lens):
    out, s = [], 0
    for n in lens:
        out.append(F.scaled_dot_product_attention(*(t[s:s + n].transpose(0, 1) for t in (q, k, v))).transpose(0, 1))
        s += n
    return torch.cat(out)


def test_varlen_is_the_packed_backend_for_bf16_on_this_gpu():
    if not _flash_capable():
        pytest.skip("flash attention needs compute capability >= 8.0")
    backend, why = packed_attention_backend(torch.device("cuda"), torch.bfloat16, 64)
    assert backend == "varlen", why
    backend, why = packed_attention_backend(torch.device("cuda"), torch.float32, 64)
    assert backend != "varlen" and any("fp16 / bf16" in r for r in why)


@pytest.mark.parametrize("backend, dtype", [("varlen", torch.bfloat16), ("varlen", torch.float16),
                                            ("nested", torch.bfloat16), ("nested", torch.float32),
                                            ("dense", torch.float32)])
def test_packed_backends_match_per_image_attention(backend, dtype):
    """Forward and every gradient against float64 per-image attention, for each backend the step
    can take on CUDA (the nested route's length bounds size its CUDA kernels' work); the error
    is bounded by 2x that of torch's own per-image SDPA in the same dtype, plus a margin."""
    if backend == "varlen" and not _flash_capable():
        pytest.skip("flash attention needs compute capability >= 8.0")
    torch.manual_seed(0)
    T, H, d = sum(LENS), 4, 64
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    base = [torch.randn(T, H, d, device="cuda", dtype=torch.float64) for _ in range(3)]
    g = torch.randn(T, H, d, device="cuda", dtype=torch.float64)

    def run(fn, dt):
        q, k, v = (t.to(dt).requires_grad_(True) for t in base)
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), g.to(dt))
        return [out.double()] + [t.double() for t in grads]

    ref = run(lambda q, k, v: _per_image(q, k, v, LENS), torch.float64)
    torch_low = run(lambda q, k, v: _per_image(q, k, v, LENS), dtype)
    got = run(lambda q, k, v: packed_attention(q, k, v, cu, max(LENS), backend=backend, lengths=LENS), dtype)
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), got, torch_low, ref):
        err, torch_err = (a - r).abs().max().item(), (t - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-2 * r.abs().max().item(), (name, err, torch_err)


def _models():
    from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig

    torch.manual_seed(0)
    vit = ViTConfig(img_size=32, patch_size=4, embed_dim=128, depth=3, num_heads=2)  # head dim 64
    base = BaseModel(vit, topk=3).cuda()
    model = TECModel(TECConfig(encoder=vit, decoder_dim=64, decoder_depth=1, decoder_heads=2,
                               num_adapters=1, tau=1.0)).cuda()
    return base, model


@pytest.mark.parametrize("masking", ["random", "block"])
def test_packed_step_makes_no_host_sync(masking):
    """The trainer's packed step (ratios 0.6:0.9 or block masks, bf16 autocast, varlen attention)
    forward + backward with CUDA's sync debug mode set to raise: nothing waits for the GPU."""
    if not _flash_capable():
        pytest.skip("flash attention needs compute capability >= 8.0")
    from tec_fast.training.objectives import TECObjective

    base, model = _models()
    objective = TECObjective(base, (0.6, 0.9), 64, masking=masking)
    images = torch.randn(8, 3, 32, 32, device="cuda")

    def step(seed):
        noise = torch.rand(8, objective.noise_columns, generator=torch.Generator().manual_seed(seed))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = objective(model, (images, None), noise)
        out["loss"].backward()
        return out["loss"]

    step(0)  # compiles the kernels, allocates
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


def test_native_step_makes_no_host_sync():
    """Native resolution as the trainer feeds it (per-image noise kept on the host, images of
    three sizes, so the ragged losses gather by length group): no host sync in forward+backward."""
    if not _flash_capable():
        pytest.skip("flash attention needs compute capability >= 8.0")
    from tec_fast import TECConfig, ViTConfig
    from tec_fast.models.native import NativeTECModel
    from tec_fast.training.loop import _to_device
    from tec_fast.training.objectives import NativeTECObjective

    base, _ = _models()
    torch.manual_seed(1)
    model = NativeTECModel(TECConfig(encoder=ViTConfig(img_size=32, patch_size=4, embed_dim=128, depth=3,
                                                       num_heads=2),
                                     decoder_dim=64, decoder_depth=1, decoder_heads=2, num_adapters=1,
                                     tau=1.0)).cuda()
    objective = NativeTECObjective(base, 0.75, 4, 4096)
    sizes = [(32, 32), (24, 40), (16, 32), (32, 32)]
    batch = objective.collate([(torch.randn(3, h, w), torch.rand(h // 4 * (w // 4))) for h, w in sizes])

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = objective(model, _to_device(batch, torch.device("cuda")), None)
        out["loss"].backward()
        return out["loss"]

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


def test_packed_step_on_varlen_matches_nested(monkeypatch):
    """The same packed step with the varlen kernel and with nested-tensor SDPA (forced): losses
    and gradients agree to bf16 accuracy."""
    if not _flash_capable():
        pytest.skip("flash attention needs compute capability >= 8.0")
    from tec_fast.ops import attention
    from tec_fast.training.objectives import TECObjective

    noise = torch.rand(8, 65, generator=torch.Generator().manual_seed(3))
    images = torch.randn(8, 3, 32, 32, device="cuda")
    runs = {}
    for forced in ("varlen", "nested"):
        monkeypatch.setenv("TEC_FAST_PACKED_ATTENTION", forced)
        attention.reload_environment()
        base, model = _models()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = TECObjective(base, (0.6, 0.9), 64)(model, (images, None), noise)
        out["loss"].backward()
        runs[forced] = out["loss"].item(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                      if p.grad is not None])
    attention.reload_environment()
    (lv, gv), (ln, gn) = runs["varlen"], runs["nested"]
    assert abs(lv - ln) <= 2e-2 * abs(ln), (lv, ln)
    assert (gv - gn).norm() <= 5e-2 * gn.norm(), ((gv - gn).norm().item(), gn.norm().item())


def test_packed_fit_stays_eager_and_says_why():
    """fit with per-image ratios on CUDA: graphs are the default but the shapes change per batch,
    so the run is eager and the result names the reason."""
    from torch.utils.data import TensorDataset

    from tec_fast.training import FitConfig, fit
    from tec_fast.training.objectives import TECObjective
    from train_helpers import tiny_base, tiny_tec, tiny_vit

    data = TensorDataset(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long))
    objective = TECObjective(tiny_base().cuda(), (0.6, 0.9), tiny_vit().num_patches)
    r = fit(tiny_tec(), objective, data, FitConfig(batch_size=4, max_steps=3, precision="bf16",
                                                    progress=False, warmup_steps=1))
    assert r.cuda_graph.startswith("eager: it needs one fixed mask ratio") and r.steps == 3
