"""Token layouts: the ragged ops equal per-image dense runs, a ragged native batch equals the dense
path image by image (losses and every gradient), mask ratio 0 is refused for a whole batch and
defined for one image, and the dense path builds none of the packed layout's indices."""
import numpy as np
import pytest
import torch

from tec_fast import BaseModel, TECConfig, ViTConfig, ops
from tec_fast.models.layout import TokenLayout
from tec_fast.native import NativeBatch, NativeTECModel, native_base_targets, native_tec_loss


def _models(seed=0, relation=True, base_vit=None):
    torch.manual_seed(seed)
    base = BaseModel(base_vit or ViTConfig(16, 4, 24, 2, 3), topk=3 if relation else None)
    model = NativeTECModel(TECConfig(encoder=ViTConfig(16, 4, 32, 3, 2), decoder_dim=16, decoder_depth=1,
                                     decoder_heads=2, tau=1.0, pred_dim=24, pred_heads=3, relation=relation))
    return base, model


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


# ------------------------------------------------------------------------------------------------
# ragged ops
# ------------------------------------------------------------------------------------------------
LENGTHS = [5, 3, 5, 7, 3]  # groups {3: [1, 4], 5: [0, 2], 7: [3]}: not consecutive -> gathers


def test_patch_norm_mse_ragged_equals_one_pass_definition():
    torch.manual_seed(0)
    T, C = sum(LENGTHS), 6
    pred = torch.randn(T, C, dtype=torch.float64, requires_grad=True)
    target = torch.randn(T, C, dtype=torch.float64)
    mask = (torch.rand(T) < 0.6).double()
    mask[:5] = 0  # image 0 has no hidden patch: it adds nothing
    mask[13:20] = 0  # nor image 3, alone in its length group
    mask[5] = 1
    got = ops.patch_norm_mse_ragged(pred, target, mask, LENGTHS)
    num, den = 0.0, 0.0
    for p, t, m in zip(pred.split(LENGTHS), target.split(LENGTHS), mask.split(LENGTHS)):
        tn = (t - t.mean(0)) / torch.sqrt(t.var(0) + 1e-6)  # unbiased, per image
        num = num + (((p - tn) ** 2).mean(-1) * m).sum()
        den = den + m.sum()
    want = num / den
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)  # float64 in, float64 throughout
    g_got, = _grads(got, [pred])
    g_want, = _grads(want, [pred])
    assert torch.isfinite(g_got).all() and g_got[:5].abs().max() == 0 and g_got[13:20].abs().max() == 0
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)


def test_relation_ops_ragged_equal_per_image_dense_ops():
    torch.manual_seed(1)
    H, d = 3, 4
    tokens = [n + 1 for n in LENGTHS]
    q = torch.randn(sum(tokens), H, d, requires_grad=True)
    k = torch.randn(sum(tokens), H, d, requires_grad=True)
    rel, idx = ops.relation_targets_ragged(q.detach(), k.detach(), tokens, 2, 0.5)
    target = [r * 3 for r in rel]
    loss = ops.relation_loss_ragged(q, k, tokens, idx, target, 1.3, 0.7)
    per_image = []
    for b, (qb, kb) in enumerate(zip(q.split(tokens), k.split(tokens))):
        qb, kb = qb.permute(1, 0, 2)[None], kb.permute(1, 0, 2)[None]  # [1, H, N_b, d]
        r, i = ops.relation_targets(qb.detach(), kb.detach(), 2, 0.5)
        torch.testing.assert_close(rel[b], r[0])
        assert idx[b].tolist() == i[0].tolist()
        per_image.append(ops.relation_loss(qb, kb, i, r * 3, 1.3, 0.7))
    want = torch.stack(per_image).mean()
    torch.testing.assert_close(loss, want)
    for a, b in zip(_grads(loss, [q, k]), _grads(want, [q, k])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ragged_ops_refuse_lengths_that_do_not_add_up():
    with pytest.raises(ValueError, match="lengths"):
        ops.patch_norm_mse_ragged(torch.randn(7, 2), torch.randn(7, 2), torch.ones(7), [3, 3])
    with pytest.raises(ValueError, match="lengths"):
        ops.relation_targets_ragged(torch.randn(7, 1, 2), torch.randn(7, 1, 2), [6, 1], 1, 1.0)
    # lengths are ints: a float is not truncated into one that adds up (3.9 + 4.2 -> 3 + 4 = 7)
    for lengths in ([3.9, 4.2], ["3", "4"], None):
        with pytest.raises(ValueError, match="lengths must be a sequence of ints"):
            ops.patch_norm_mse_ragged(torch.randn(7, 2), torch.randn(7, 2), torch.ones(7), lengths)
    got = ops.patch_norm_mse_ragged(torch.ones(7, 2), torch.ones(7, 2), torch.ones(7), [np.int64(3), torch.tensor(4)])
    assert torch.isfinite(got)


def test_relation_loss_ragged_names_a_per_image_entry_that_does_not_stack():
    """Images of one token count are stacked into one dense call: their top-k indices and
    targets must agree in shape (one k), and be tensors."""
    q, k = torch.randn(8, 1, 2), torch.randn(8, 1, 2)
    idx = [torch.tensor([0, 1]), torch.tensor([2])]
    target = [torch.randn(3, 1, 3), torch.randn(2, 1, 3)]
    with pytest.raises(ValueError, match=r"topk_idx\[1\] must be shaped like topk_idx\[0\] .*got \(1,\) against \(2,\)"):
        ops.relation_loss_ragged(q, k, [4, 4], idx, target, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"target\[1\] must be shaped like target\[0\]"):
        ops.relation_loss_ragged(q, k, [4, 4], [idx[0], idx[0]], target, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"topk_idx\[0\] must be a tensor, got list"):
        ops.relation_loss_ragged(q, k, [4, 4], [[0, 1], [0, 1]], [target[0]] * 2, 1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# one model over every layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relation", [True, False])
def test_ragged_native_batch_equals_dense_image_by_image(relation):
    """Squares at positions 0 and 2 of a mixed batch (so the ragged path gathers them) give the
    dense path's numbers: losses and every parameter gradient, combined as the losses define."""
    base, model = _models(4, relation)
    g = torch.Generator().manual_seed(4)
    sq = torch.randn(2, 3, 16, 16, generator=g)
    odd = torch.randn(3, 8, 24, generator=g)  # 2 x 6 patches
    batch = NativeBatch([sq[0], odd, sq[1]], 4)
    assert not batch.layout.uniform
    noise = [torch.rand(L, generator=g) for L in batch.lengths]
    mixed = native_tec_loss(model, batch, native_base_targets(base, batch), 0.75, noise=noise)
    dense = model(sq, base(sq), 0.75, torch.stack([noise[0], noise[2]]))
    single_batch = NativeBatch([odd], 4)
    single = native_tec_loss(model, single_batch, native_base_targets(base, single_batch), 0.75, noise=[noise[1]])
    m_sq, m_odd = 2 * (16 - 4), 12 - 3  # hidden patches
    feature = (m_sq * dense["feature"] + m_odd * single["feature"]) / (m_sq + m_odd)
    rel = (2 * dense["relation"] + single["relation"]) / 3
    torch.testing.assert_close(mixed["feature"], feature, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed["relation"], rel, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    for n, a, b in zip(names, _grads(mixed["loss"], params), _grads(feature + rel, params)):
        if a is None or b is None:
            assert a is None and b is None, n
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_native_base_with_pre_norm_and_patch_only_pos_embed_matches_dense():
    vit = ViTConfig(16, 4, 24, 2, 3, pre_norm=True, no_embed_class=True)
    base, _ = _models(5, base_vit=vit)
    with torch.no_grad():
        base.pos_embed.normal_(std=0.1)  # learned
    x = torch.randn(2, 3, 16, 16)
    dense, native = base(x), native_base_targets(base, NativeBatch(list(x), 4))
    for b in range(2):
        torch.testing.assert_close(native.features[b], dense.features[b], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(native.relation[b], dense.relation[b], rtol=1e-4, atol=1e-5)
    reg, _ = _models(5, base_vit=ViTConfig(16, 4, 24, 2, 3, reg_tokens=2))
    with pytest.raises(ValueError, match="reg_tokens"):
        native_base_targets(reg, NativeBatch(list(x), 4))


def test_dense_path_builds_no_packed_indices():
    base, model = _models(6)
    x = torch.randn(2, 3, 16, 16)
    layout = model.layout_for(2, 0.75, device=x.device)
    assert layout.dense and layout.uniform
    model.forward_layout(layout, x, base(x))
    built = {"cu_tokens", "cls_index", "image_id", "patch_index"} & set(vars(layout))
    assert not built, f"the dense path built {built}"


def test_layout_indices_and_positions():
    lay = TokenLayout([(2, 3), (1, 2)])
    assert lay.cu_tokens.tolist() == [0, 7, 10] and lay.cls_index.tolist() == [0, 7]
    assert lay.patch_index.tolist() == [1, 2, 3, 4, 5, 6, 8, 9]
    assert lay.positions.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [0, 0], [0, 1]]
    masked = lay.with_keep(torch.tensor([1, 0, 0, 1, 0, 1, 0, 1], dtype=torch.bool))
    assert masked.enc_index.tolist() == [0, 1, 4, 6, 7, 9] and masked.cu_enc.tolist() == [0, 4, 6]
    assert masked.hidden == [3, 1] and masked.max_enc == 4
    with pytest.raises(ValueError, match="no visible patch"):
        lay.with_keep(torch.tensor([1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# mask ratio 0 (issue 10 item 4): refused for a whole batch, defined for one image, never NaN
# ------------------------------------------------------------------------------------------------
def _finite_step(out, model):
    out["loss"].backward()
    assert all(torch.isfinite(out[k]) for k in ("loss", "feature", "relation"))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mask_ratio_zero_for_the_whole_batch_is_refused():
    base, model = _models(7)
    x = torch.randn(2, 3, 16, 16)
    t = base(x)
    for ratio in (0.0, 0, [0.0, 0.0]):
        with pytest.raises(ValueError, match="hides no patch"):
            model(x, t, ratio)
    with pytest.raises(ValueError, match="hides no patch"):
        model(x, t, keep=torch.ones(2, 16, dtype=torch.bool))
    batch = NativeBatch([x[0], torch.randn(3, 8, 24)], 4)
    with pytest.raises(ValueError, match="hides no patch"):
        native_tec_loss(model, batch, native_base_targets(base, batch), 0.0)


def test_mask_ratio_zero_for_one_image_adds_nothing_to_the_feature_loss():
    base, model = _models(8)
    x = torch.randn(2, 3, 16, 16)
    t = base(x)
    noise = torch.rand(2, 16)
    out = model(x, t, [0.0, 0.75], noise)
    alone = model(x[1:], type(t)(*(v[1:] for v in t)), 0.75, noise[1:])
    torch.testing.assert_close(out["feature"], alone["feature"], rtol=1e-5, atol=1e-6)
    _finite_step(out, model)
    model.zero_grad()
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[1, :5] = False
    _finite_step(model(x, t, keep=keep), model)


def test_native_image_with_mask_ratio_zero_is_defined():
    base, model = _models(9)
    g = torch.Generator().manual_seed(9)
    imgs = [torch.randn(3, 16, 16, generator=g), torch.randn(3, 8, 24, generator=g),
            torch.randn(3, 24, 8, generator=g)]
    batch = NativeBatch(imgs, 4)
    noise = [torch.rand(L, generator=g) for L in batch.lengths]
    t = native_base_targets(base, batch)
    out = native_tec_loss(model, batch, t, [0.75, 0.0, 0.5], noise=noise)
    rest = NativeBatch([imgs[0], imgs[2]], 4)
    alone = native_tec_loss(model, rest, native_base_targets(base, rest), [0.75, 0.5], noise=[noise[0], noise[2]])
    torch.testing.assert_close(out["feature"], alone["feature"], rtol=1e-5, atol=1e-6)
    _finite_step(out, model)


def _native_step(seed=10):
    base, model = _models(seed)
    g = torch.Generator().manual_seed(seed)
    batch = NativeBatch([torch.randn(3, 16, 16, generator=g), torch.randn(3, 8, 24, generator=g),
                         torch.randn(3, 16, 16, generator=g)], 4)
    noise = [torch.rand(L, generator=g) for L in batch.lengths]
    t = native_base_targets(base, batch)
    out = native_tec_loss(model, batch, t, [0.75, 0.5, 0.0], noise=noise)
    out["loss"].backward()
    return t, out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_ragged_step_on_the_triton_path_matches_the_reference(monkeypatch, request):
    """The ragged ops hand each length group to the fused kernels (strided views, gathers)."""
    monkeypatch.setenv("TEC_FAST_KERNELS", "reference")
    t_ref, out_ref, g_ref = _native_step()
    request.getfixturevalue("triton_path")
    t, out, g = _native_step()
    for a, b in zip(t.relation + t.features, t_ref.relation + t_ref.features):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [i.tolist() for i in t.topk_idx] == [i.tolist() for i in t_ref.topk_idx]
    for key in ("loss", "feature", "relation"):
        torch.testing.assert_close(out[key], out_ref[key], rtol=1e-5, atol=1e-6)
    for name, grad in g.items():
        torch.testing.assert_close(grad, g_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
