"""With the Triton path forced (interpreter on CPU), the whole TEC step — base targets, both
losses, the gradient w.r.t. the image and every parameter gradient — matches the reference path."""
import torch

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig


def _run(seed=0):
    torch.manual_seed(seed)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3), topk=3)
    model = TECModel(TECConfig(encoder=ViTConfig(16, 4, 20, 3, 2), decoder_dim=12, decoder_depth=1,
                               decoder_heads=2, tau=1.3, pred_dim=24, pred_heads=3, num_adapters=1))
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(2, 3, 16, 16, generator=g).requires_grad_(True)
    noise = torch.rand(2, 16, generator=g)
    t = base(images.detach())
    out = model(images, t, mask_ratio=0.75, noise=noise)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return t, out, images.grad.clone(), grads


def test_whole_step_triton_matches_reference(monkeypatch, request):
    monkeypatch.setenv("TEC_FAST_KERNELS", "reference")
    t_ref, out_ref, gx_ref, g_ref = _run()
    request.getfixturevalue("triton_path")
    t, out, gx, g = _run()
    torch.testing.assert_close(t.features, t_ref.features)
    assert torch.equal(t.topk_idx, t_ref.topk_idx)
    torch.testing.assert_close(t.relation, t_ref.relation, rtol=1e-5, atol=1e-5)
    for key in ("loss", "feature", "relation"):
        torch.testing.assert_close(out[key], out_ref[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-6)
    for name, grad in g.items():
        torch.testing.assert_close(grad, g_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
