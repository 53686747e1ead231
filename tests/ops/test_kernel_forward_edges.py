"""Forward kernels on inputs at the edges of their launch layouts: operands whose rows are not
packed (a row stride other than the width), index values at their bounds, tiles with a partial
last block. Each result is checked against a plain computation of its definition."""
import pytest
import torch

from conftest import assert_close
from tec_fast import ops


def _scatter_by_definition(vis, ids, tok, pos):
    """out[b, j] = (vis[b, r] if r < K else tok) + pos[j], r = ids[b, j], in float64."""
    B, K, C = vis.shape
    L = ids.shape[1]
    out = torch.empty(B, L, C, dtype=torch.float64)
    for b in range(B):
        for j in range(L):
            r = int(ids[b, j])
            out[b, j] = (vis[b, r].double() if r < K else tok.double()) + pos[j].double()
    return out


def test_scatter_masked_reads_visible_rows_at_their_row_stride(triton_path):
    """vis a channel slice of a wider tensor: rows C apart in the op's view, 2C apart in memory."""
    g = torch.Generator().manual_seed(0)
    B, L, K, C = 2, 7, 3, 5
    vis = torch.randn(B, K, 2 * C, generator=g)[..., :C]
    assert vis.stride(-1) == 1 and vis.stride(1) == 2 * C
    tok = torch.randn(C, generator=g)
    pos = torch.randn(L, C, generator=g)
    ids = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    out = ops.scatter_masked(vis, ids, tok, pos)
    assert_close(out, _scatter_by_definition(vis, ids, tok, pos), atol=1e-6, rtol=1e-6, name="out")


def test_patch_norm_mse_reads_target_rows_at_their_row_stride(triton_path):
    """target a channel slice of a wider tensor (patch rows 2C apart): the per-channel
    statistics and the error both read the patches at target's own row stride."""
    from tec_fast.ops import reference
    g = torch.Generator().manual_seed(1)
    B, L, C = 2, 9, 6
    pred = torch.randn(B, L, C, generator=g)
    target = (3.0 * torch.randn(B, L, 2 * C, generator=g) + 1.0)[..., :C]
    assert target.stride(-1) == 1 and target.stride(1) == 2 * C
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[:, 0] = True
    got = ops.patch_norm_mse(pred, target, mask)
    want = reference.patch_norm_mse(pred.double(), target.double(), mask)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="loss")


@pytest.mark.parametrize("bad", [8, -1])
def test_relation_loss_with_one_head_refuses_an_index_out_of_range(triton_path, bad):
    """H = 1: the single head's program is the one that flags a bad topk index."""
    g = torch.Generator().manual_seed(2)
    B, H, N, d = 2, 1, 9, 4
    q = torch.randn(B, H, N, d, generator=g)
    k = torch.randn(B, H, N, d, generator=g)
    idx = torch.tensor([[0, 7, 3], [2, 5, 1]])
    idx[1, 2] = bad
    target = torch.randn(B, 4, H, N - 1, generator=g)
    with pytest.raises(ValueError, match=r"topk_idx holds indices in .*outside \[0, 8\)"):
        ops.relation_loss(q, k, idx, target, 1.8, 0.5)


def test_relation_targets_ranks_with_q_and_k_at_different_head_strides(triton_path):
    """q a [B, N, H, d] buffer seen as [B, H, N, d] (head stride d), k packed (head stride N d):
    the ranking reads q's CLS row at q's own head stride."""
    from tec_fast.ops import reference
    g = torch.Generator().manual_seed(3)
    B, H, N, d, topk = 2, 3, 11, 8, 4
    q = torch.randn(B, N, H, d, generator=g).permute(0, 2, 1, 3)
    k = torch.randn(B, H, N, d, generator=g)
    assert q.stride(1) != k.stride(1) and q.stride(-1) == 1
    relation, idx = ops.relation_targets(q, k, topk, d ** -0.5)
    want_rel, want_idx = reference.relation_targets(q.double(), k.double(), topk, d ** -0.5)
    assert torch.equal(idx, want_idx)
    assert_close(relation, want_rel, atol=1e-5, rtol=1e-5, name="relation")


def test_patch_embed_with_patch_width_over_one_column_block(triton_path):
    """K = C p p = 300: more than one 256-wide block of patch values, the last one partial."""
    g = torch.Generator().manual_seed(4)
    B, C, p, S, D = 1, 3, 10, 20, 5
    images = torch.randn(B, C, S, S, generator=g)
    weight = torch.randn(D, C, p, p, generator=g) * 0.1
    bias = torch.randn(D, generator=g)
    out = ops.patch_embed(images, weight, bias)
    want = torch.nn.functional.conv2d(images.double(), weight.double(), bias.double(), stride=p)
    want = want.flatten(2).transpose(1, 2)  # [B, L, D]
    assert_close(out, want, atol=1e-4, rtol=1e-4, name="out")


@pytest.mark.parametrize("op", ["masked_gather", "scatter_masked"])
def test_empty_output_refuses_an_index_equal_to_its_bound(triton_path, op):
    """C = 0: no kernel runs, and an index equal to L (one past the last row) is still refused."""
    B, L, K = 2, 6, 3
    if op == "masked_gather":
        ids = torch.tensor([[0, 3, 5], [1, 2, L]])
        call = lambda: ops.masked_gather(torch.randn(B, L, 0), ids, torch.randn(L, 0))  # noqa: E731
        name = "ids_keep"
    else:
        ids = torch.stack([torch.randperm(L) for _ in range(B)])
        ids[0, 4] = L
        call = lambda: ops.scatter_masked(torch.randn(B, K, 0), ids, torch.randn(0), torch.randn(L, 0))  # noqa: E731
        name = "ids_restore"
    with pytest.raises(ValueError, match=rf"{name} holds indices in \[0, {L}\], outside \[0, {L}\)"):
        call()


def test_relation_rows_past_sixteen_query_rows(triton_path):
    """topk = 16: 1 + k = 17 query rows, one more than a 16-row tile; every row's logits and
    the relation loss over them against float64 references."""
    from tec_fast.ops import reference
    g = torch.Generator().manual_seed(5)
    B, H, N, d, topk = 1, 1, 21, 16, 16
    q = torch.randn(B, H, N, d, generator=g)
    k = torch.randn(B, H, N, d, generator=g)
    relation, idx = ops.relation_targets(q, k, topk, d ** -0.5)
    want_rel, want_idx = reference.relation_targets(q.double(), k.double(), topk, d ** -0.5)
    assert torch.equal(idx, want_idx)
    assert_close(relation, want_rel, atol=1e-5, rtol=1e-5, name="relation")
    target = torch.randn(B, 1 + topk, H, N - 1, generator=g)
    loss = ops.relation_loss(q, k, idx, target, 0.7, d ** -0.5)
    want = reference.relation_loss(q.double(), k.double(), idx, target.double(), 0.7, d ** -0.5)
    assert_close(loss, want, atol=1e-5, rtol=1e-5, name="loss")


def test_layer_norm_reads_rows_of_x_and_residual_at_their_row_stride(triton_path):
    """x and residual channel slices of wider [rows, 2C] buffers (rows 2C apart)."""
    g = torch.Generator().manual_seed(6)
    rows, C = 5, 24
    x = torch.randn(rows, 2 * C, generator=g)[:, :C]
    res = torch.randn(rows, 3 * C, generator=g)[:, C:2 * C]
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    y, h = ops.layer_norm(x, w, b, 1e-6, residual=res)
    h64 = x.double() + res.double()
    y64 = torch.nn.functional.layer_norm(h64, (C,), w.double(), b.double(), 1e-6)
    assert_close(h, h64, atol=1e-6, rtol=1e-6, name="h")
    assert_close(y, y64, atol=1e-5, rtol=1e-5, name="y")
    y_only = ops.layer_norm(x, w, b, 1e-6)
    assert_close(y_only, torch.nn.functional.layer_norm(x.double(), (C,), w.double(), b.double(), 1e-6),
                 atol=1e-5, rtol=1e-5, name="y without residual")


def test_layer_norm_bf16_normalises_the_rounded_sum(triton_path):
    """bf16 x + residual: h is the rounded sum, and y normalises that h (as eager LayerNorm of
    the stored h does), not the fp32 sum. A large mean makes the two differ by far more than
    y's own rounding."""
    g = torch.Generator().manual_seed(7)
    rows, C = 4, 48
    x = (100.0 + torch.randn(rows, C, generator=g)).to(torch.bfloat16)
    res = (0.37 * torch.randn(rows, C, generator=g)).to(torch.bfloat16)
    w, b = torch.ones(C), torch.zeros(C)
    y, h = ops.layer_norm(x, w.to(torch.bfloat16), b.to(torch.bfloat16), 1e-6, residual=res)
    h_rounded = (x.double() + res.double()).to(torch.bfloat16)
    assert torch.equal(h, h_rounded)
    y64 = torch.nn.functional.layer_norm(h_rounded.double(), (C,), w.double(), b.double(), 1e-6)
    # two bf16 units of the last place of |y| <= 4, plus what the fp32 statistics add
    assert_close(y, y64, atol=0.04, rtol=0.0, name="y")


def test_mlp_gelu_op_takes_a_non_contiguous_pre_activation(triton_path):
    """The registered ``tec_fast::mlp_gelu`` op on a column slice of a wider tensor."""
    import tec_fast.kernels.mlp  # noqa: F401  (registers the op)
    g = torch.Generator().manual_seed(8)
    pre = torch.randn(6, 40, generator=g)[:, 3:33]
    assert not pre.is_contiguous()
    h = torch.ops.tec_fast.mlp_gelu(pre)
    p = pre.double()
    want = 0.5 * p * (1.0 + torch.erf(p / 2 ** 0.5))
    assert_close(h, want, atol=1e-6, rtol=1e-6, name="h")
