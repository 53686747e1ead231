"""The engine's reference path against the eager oracle written the public reference code's way
(benchmarks/baseline_eager.py): targets, both losses and the gradient w.r.t. the input image."""
import pytest
import torch

from benchmarks.baseline_eager import EagerBase, EagerTEC
from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pos_embed" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.5)
                    + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))


CASES = [
    # (base ViT, new ViT, decoder dim/depth/heads, adapters, input_adapter, relation, topk, last_layers)
    (ViTConfig(32, 8, 48, 3, 3), ViTConfig(32, 8, 64, 6, 4), (32, 2, 4), None, True, True, 5, 2),
    (ViTConfig(28, 4, 40, 2, 5), ViTConfig(28, 4, 36, 4, 3), (24, 1, 2), 2, False, True, 1, 1),
    (ViTConfig(24, 8, 32, 2, 2), ViTConfig(24, 8, 32, 3, 2), (16, 1, 2), 1, True, False, None, 2),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_engine_matches_eager_reference(case):
    bvit, vit, (cd, dd, dh), G, inp, rel, topk, last = CASES[case]
    torch.manual_seed(case)
    base = BaseModel(bvit, last_layers=last, topk=topk)
    _randomize(base, 10 + case)
    ebase = EagerBase(bvit, last_layers=last, topk=topk)
    ebase.load_state_dict(base.state_dict())
    cfg = TECConfig(encoder=vit, decoder_dim=cd, decoder_depth=dd, decoder_heads=dh, input_adapter=inp,
                    relation=rel, tau=1.8 if rel else None, pred_dim=bvit.embed_dim,
                    pred_heads=bvit.num_heads, num_adapters=G)
    model = TECModel(cfg)
    _randomize(model, 20 + case)
    eager = EagerTEC(cfg)
    own_tables = {"pos_embed", "decoder_pos_embed"}  # the oracle's sin-cos tables, made apart from the engine's
    missing, unexpected = eager.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k not in own_tables}, strict=False)
    assert set(missing) == own_tables and not unexpected

    B = 3
    imgs = torch.randn(B, 3, vit.img_size, vit.img_size)
    t = base(imgs)
    et = ebase(imgs)
    torch.testing.assert_close(t.features, et[0], rtol=1e-5, atol=1e-5)
    if rel:
        assert torch.equal(t.topk_idx, et[2])
        torch.testing.assert_close(t.relation, et[1], rtol=1e-5, atol=1e-5)
    else:
        assert t.relation is None and t.topk_idx is None

    noise = torch.rand(B, vit.num_patches)
    x1 = imgs.clone().requires_grad_(True)
    x2 = imgs.clone().requires_grad_(True)
    out = model(x1, t, mask_ratio=0.75, noise=noise)
    ref = eager(x2, et, mask_ratio=0.75, noise=noise)
    for key in ("loss", "feature", "relation"):
        assert out[key].dim() == 0
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    ref["loss"].backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-7)
    eager_params = dict(eager.named_parameters())
    assert set(eager_params) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_params[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
