"""Small, hand-checkable cases for each formula of docs/tec.md, and config validation."""
import math

import numpy as np
import pytest
import torch

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast.models.layers import sincos_pos_embed
from tec_fast.masking import random_masking
from tec_fast.ops import reference


def test_sincos_layout_by_hand():
    P = sincos_pos_embed(8, 2)  # [1 + 4, 8], patches row-major over a 2x2 grid
    assert P.shape == (5, 8)
    assert torch.equal(P[0], torch.zeros(8))  # CLS row
    # patch j=2 is (row 1, col 0): first half encodes the column (0), second half the row (1);
    # each half = [sin(pos*w_0), sin(pos*w_1), cos(pos*w_0), cos(pos*w_1)], w_i = 10000^(-i/2)
    w = [1.0, 0.01]
    col = [0.0, 0.0, 1.0, 1.0]
    row = [math.sin(w[0]), math.sin(w[1]), math.cos(w[0]), math.cos(w[1])]
    torch.testing.assert_close(P[3], torch.tensor(col + row))
    # patch j=1 is (row 0, col 1)
    torch.testing.assert_close(P[2], torch.tensor(row + col))


def test_masking_by_hand():
    noise = torch.tensor([[0.3, 0.1, 0.9, 0.5]])
    m = random_masking(1, 4, 0.5, noise=noise)
    assert m.ids_keep.tolist() == [[1, 0]]          # argsort ascending, first K=2
    assert m.ids_restore.tolist() == [[1, 0, 3, 2]]  # argsort of ids_shuffle [1, 0, 3, 2]
    assert m.mask.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    # a shuffle that is not its own inverse: ids_restore and ids_shuffle differ, and the mask must
    # be unshuffled with ids_restore (with ids_shuffle it would read [1, 0, 1, 1, 0])
    m = random_masking(1, 5, 0.6, noise=torch.tensor([[0.3, 0.9, 0.1, 0.5, 0.7]]))
    assert m.ids_keep.tolist() == [[2, 0]]                 # ids_shuffle [2, 0, 3, 4, 1], K = int(5 * 0.4) = 2
    assert m.ids_restore.tolist() == [[1, 4, 0, 2, 3]]
    assert m.mask.tolist() == [[0.0, 1.0, 0.0, 1.0, 1.0]]  # patches 3, 4, 1 removed


def test_masking_keeps_int_of_ratio_and_is_reproducible():
    noise = torch.rand(3, 49)
    a = random_masking(3, 49, 0.75, noise=noise)
    b = random_masking(3, 49, 0.75, noise=noise.clone())
    assert a.ids_keep.shape == (3, int(49 * 0.25))
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)
    assert (a.mask.sum(1) == 49 - int(49 * 0.25)).all()
    # K = int(L * (1 - r)) truncates: 49 x 0.4 = 19.6 keeps 19 (rounding would keep 20), in the
    # dense layout of the model too
    assert random_masking(2, 49, 0.6).ids_keep.shape == (2, 19)
    model = TECModel(TECConfig(encoder=ViTConfig(28, 4, 32, 3, 2), decoder_dim=16, decoder_depth=1,
                               decoder_heads=2, relation=False, tau=None))
    layout = model.layout_for(2, mask_ratio=0.6)
    assert layout.ids_keep.shape == (2, 19) and layout.hidden == [30, 30]
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 4, 1.0)
    with pytest.raises(ValueError, match="noise"):
        random_masking(2, 4, 0.5, noise=torch.rand(2, 5))


def test_patch_norm_mse_by_hand():
    target = torch.tensor([[[0.0], [2.0]]])  # mean 1, unbiased var 2
    pred = torch.zeros(1, 2, 1)
    mask = torch.tensor([[0.0, 1.0]])
    loss = reference.patch_norm_mse(pred, target, mask, eps=1e-6)
    torch.testing.assert_close(loss, torch.tensor(1.0 / (2.0 + 1e-6)))
    # the normalised target itself is the perfect prediction
    norm = (target - 1.0) / math.sqrt(2.0 + 1e-6)
    assert reference.patch_norm_mse(norm, target, mask).item() < 1e-12


def test_relation_loss_by_hand():
    B, H, N, d = 1, 2, 5, 3
    q = torch.zeros(B, H, N, d)
    k = torch.randn(B, H, N, d)
    idx = torch.tensor([[2]])
    target = torch.randn(B, 2, H, N - 1)
    # q = 0 gives uniform predicted logits: loss = log(L) whatever the target
    loss = reference.relation_loss(q, k, idx, target, tau=1.8, scale=0.5)
    torch.testing.assert_close(loss, torch.tensor(math.log(N - 1)))
    # the temperature applies to the target only: the loss is the cross-entropy to softmax(T/tau)
    q = torch.randn(B, H, N, d)
    loss = reference.relation_loss(q, k, idx, target, tau=2.0, scale=0.5)
    rows = [0, 3]
    want = 0
    for r_i, r in enumerate(rows):
        for h in range(H):
            logits = (q[0, h, r] @ k[0, h, 1:].T) * 0.5
            p = torch.softmax(target[0, r_i, h] / 2.0, -1)
            want = want - (p * torch.log_softmax(logits, -1)).sum()
    torch.testing.assert_close(loss, want / (len(rows) * H))


def test_relation_targets_by_hand():
    # CLS (token 0) attends most to patch 2 (token 3), then patch 0 (token 1)
    B, H, N, d = 1, 1, 5, 2
    q = torch.zeros(B, H, N, d)
    k = torch.zeros(B, H, N, d)
    q[0, 0, 0] = torch.tensor([1.0, 0.0])
    k[0, 0, 1:, 0] = torch.tensor([2.0, -1.0, 5.0, 0.0])
    q[0, 0, 3] = torch.tensor([0.0, 1.0])
    k[0, 0, 1:, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rel, idx = reference.relation_targets(q, k, 2, scale=0.5)
    assert idx.tolist() == [[2, 0]]
    assert rel.shape == (1, 3, 1, 4)
    torch.testing.assert_close(rel[0, 0, 0], torch.tensor([1.0, -0.5, 2.5, 0.0]))  # CLS row
    torch.testing.assert_close(rel[0, 1, 0], torch.tensor([0.5, 1.0, 1.5, 2.0]))   # patch 2's row
    torch.testing.assert_close(rel[0, 2, 0], q[0, 0, 1] @ k[0, 0, 1:].T * 0.5)    # patch 0's row


def test_base_features_are_mean_of_last_blocks_before_norm():
    vit = ViTConfig(16, 4, 24, 3, 2)
    base = BaseModel(vit, last_layers=2, topk=None)
    x = torch.randn(2, 3, 16, 16)
    outs = []
    h = base.embed(x)
    for blk in base.blocks:
        h = blk(h)
        outs.append(h[:, 1:])
    t = base(x)
    torch.testing.assert_close(t.features, (outs[-1] + outs[-2]) / 2)
    assert t.relation is None and t.topk_idx is None
    assert not base.training
    base.train()
    assert not base.training  # frozen: train() keeps eval mode
    assert not any(p.requires_grad for p in base.parameters())


def test_float64_inputs_are_computed_in_float64():
    """The losses and relations are computed in fp32 for fp32 and half inputs; float64 inputs (a
    ``.double()`` model, gradcheck) keep float64 end to end: fp32 would be about 1e-7 off."""
    from tec_fast import ops
    f64 = dict(dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 7, 5, generator=gen, **f64), torch.randn(2, 7, 5, generator=gen, **f64)
    target[:, :, 0] = 0.25 + 1e-4 * target[:, :, 0]  # a channel whose variance (~1e-8) is far below eps
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0]], **f64)
    loss = ops.patch_norm_mse(pred, target, mask)
    norm = (target - target.mean(1, keepdim=True)) / (target.var(1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    want = (((pred - norm) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert loss.dtype == torch.float64 and abs(float(loss - want)) <= 1e-14 * float(want)

    q, k = torch.randn(2, 3, 9, 4, generator=gen, **f64), torch.randn(2, 3, 9, 4, generator=gen, **f64)
    rel, idx = ops.relation_targets(q, k, 3, 0.3)
    rows = torch.cat([torch.zeros_like(idx[:, :1]), idx + 1], 1)  # [B, 1+k]
    logits = torch.stack([(q[b][:, rows[b]] @ k[b][:, 1:].transpose(-1, -2)).transpose(0, 1) for b in range(2)]) * 0.3
    assert rel.dtype == torch.float64 and float((rel - logits).abs().max()) <= 1e-14
    rloss = ops.relation_loss(q, k, idx, rel + 0.5 * torch.randn(rel.shape, generator=gen, **f64), 1.8, 0.3)
    assert rloss.dtype == torch.float64

    vit = ViTConfig(16, 4, 24, 3, 2)
    base = BaseModel(vit, last_layers=2, topk=3).double()
    x = torch.randn(2, 3, 16, 16, generator=gen, **f64)
    outs, h = [], base.embed(x)
    for blk in base.blocks:
        h = blk(h)
        outs.append(h[:, 1:])
    t = base(x)
    assert t.features.dtype == t.relation.dtype == torch.float64
    assert float((t.features - (outs[-1] + outs[-2]) / 2).abs().max()) <= 1e-14
    model = TECModel(TECConfig(encoder=ViTConfig(16, 4, 24, 3, 2), decoder_dim=16, decoder_depth=1,
                               decoder_heads=2, tau=1.8)).double()
    out = model(x, t, mask_ratio=0.75, noise=torch.rand(2, 16, generator=gen, **f64))
    assert all(out[key].dtype == torch.float64 for key in ("loss", "feature", "relation"))


@pytest.mark.parametrize("kwargs,field", [
    (dict(encoder=ViTConfig(32, 8, 64, 5, 4), num_adapters=2), "num_adapters"),
    (dict(pred_dim=100, pred_heads=12), "pred_dim"),
    (dict(decoder_dim=30, decoder_heads=4), "decoder_dim"),
    (dict(relation=True, tau=None), "tau"),
    (dict(relation=True, tau=-1.0), "tau"),
    (dict(encoder=ViTConfig(16, 4, 18, 3, 3)), "encoder.embed_dim"),  # sin-cos table: width % 4
    (dict(decoder_dim=18, decoder_heads=3), "decoder_dim"),
    (dict(input_adapter="no"), "input_adapter"),
    (dict(relation=1), "relation"),
])
def test_tec_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TECConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(img_size=30, patch_size=8), "img_size"),
    (dict(embed_dim=100, num_heads=12), "embed_dim"),
    (dict(depth=0), "depth"),
])
def test_vit_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ViTConfig(**kwargs)


def test_config_defaults_and_relation_off():
    cfg = TECConfig(encoder=ViTConfig(), relation=False, tau=None)
    assert cfg.num_adapters == 4 and cfg.pred_dim == 768 and cfg.pred_heads == 12
    assert TECConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("depth, groups", [(12, 4), (24, 8), (3, 1), (2, 1), (7, 1), (10, 2), (11, 1), (16, 4)])
def test_default_adapter_groups_divide_the_depth(depth, groups):
    """depth // 3 where it divides the depth (ViT-B: 4), else the largest divisor below it."""
    assert TECConfig(encoder=ViTConfig(16, 4, 32, depth, 2), decoder_dim=16, decoder_heads=2).num_adapters == groups


def test_model_arguments_name_what_is_wrong():
    base, model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    t = base(x)
    with pytest.raises(ValueError, match="targets must be the BaseModel's output"):
        model(x, tuple(t))
    with pytest.raises(ValueError, match="targets must be the BaseModel's output"):
        model(x, None)
    noise = torch.rand(2, 16)
    a = model(x, t, mask_ratio=0.75, noise=noise)["loss"]
    for ratio in (torch.tensor(0.75), np.float32(0.75), np.float64(0.75)):  # one ratio for all images
        assert torch.equal(model(x, t, mask_ratio=ratio, noise=noise)["loss"], a)
    bad = noise.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="noise holds NaN"):
        model(x, t, noise=bad)
    with pytest.raises(ValueError, match="noise must be floating point"):
        model(x, t, noise=torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="noise holds NaN"):
        model(x, t, mask_ratio=[0.5, 0.75], noise=bad)


def _tiny(relation=True):
    vit = ViTConfig(16, 4, 32, 3, 2)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3), topk=3 if relation else None)
    model = TECModel(TECConfig(encoder=vit, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                               relation=relation, tau=1.0 if relation else None, pred_dim=24, pred_heads=3))
    return base, model


def test_model_input_errors():
    base, model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    t = base(x)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 3, 12, 12), t)
    with pytest.raises(ValueError, match="targets.features"):
        model(x, t._replace(features=t.features[:, :, :5]))
    with pytest.raises(ValueError, match="targets.relation"):
        model(x, t._replace(relation=None))
    with pytest.raises(ValueError, match="noise"):
        model(x, t, noise=torch.rand(2, 7))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(x, t, mask_ratio=1.5)


def test_layer_norm_eps_of_every_module():
    """The ViT LayerNorms (blocks, the encoder's final norm, both decoder heads' norms, the base
    model's) use eps 1e-6 (docs/tec.md §1); the encoder adapter's two use torch's default 1e-5
    (the reference code's nn.LayerNorm). The model-level norms are nn.LayerNorm modules whose eps
    apply_norm hands to ops.layer_norm, so a module built with another eps computes with it."""
    base, model = _tiny()
    eps = {name: mod.eps for name, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    adapter = {n for n in eps if n.startswith("encoder_adaptor.")}
    assert adapter == {"encoder_adaptor.adap_before", "encoder_adaptor.adap_after"}
    assert {eps[n] for n in adapter} == {1e-5}
    assert {"norm", "forward_fea_decoder.decoder_norm", "forward_att_decoder.decoder_norm",
            "blocks.0.norm1", "decoder_blocks.0.norm2"} <= set(eps)
    assert {v for n, v in eps.items() if n not in adapter} == {1e-6}
    base_eps = {mod.eps for mod in base.modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert base_eps == {1e-6}


def test_loss_weights_weigh_the_two_losses():
    """loss = feature_weight x feature loss + relation_weight x relation loss (docs/tec.md §3),
    the two losses themselves unchanged by the weights."""
    base, model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    t = base(x)
    one = model(x, t, noise=noise)
    model.config.feature_weight, model.config.relation_weight = 0.3, 2.0
    weighed = model(x, t, noise=noise)
    assert weighed["feature"].item() == one["feature"].item() and weighed["relation"].item() == one["relation"].item()
    want = 0.3 * one["feature"].double() + 2.0 * one["relation"].double()
    assert abs(weighed["loss"].double().item() - want.item()) <= 1e-6 * abs(want.item())
    assert one["relation"].item() > 0.1 and one["feature"].item() > 0.1  # both weigh in
    model.config.feature_weight, model.config.relation_weight = 1.0, 0.0
    assert model(x, t, noise=noise)["loss"].item() == one["feature"].item()


def test_bf16_autocast_smoke():
    base, model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    t = base(x)
    ref = model(x, t, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tb = base(x)
        out = model(x, tb, noise=noise)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"].float(), ref["loss"].float(), rtol=0.05, atol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_few_steps_loss_falls():
    torch.manual_seed(0)
    base, model = _tiny()
    x = torch.randn(4, 3, 16, 16)
    t = base(x)
    t = t._replace(relation=t.relation * 20)  # a random base's relations are near uniform: sharpen
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    noise = torch.rand(4, 16)
    feature, relation = [], []
    for _ in range(40):
        out = model(x, t, noise=noise)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        feature.append(out["feature"].item())
        relation.append(out["relation"].item())
    # the relation loss is bounded below by the entropy of softmax(T / tau), far from 0
    assert feature[-1] < 0.5 * feature[0], feature
    assert relation[-1] < 0.8 * relation[0], relation
