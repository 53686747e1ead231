"""scatter_masked: Triton (interpreter on CPU) vs the plain-torch reference."""
import pytest
import torch

from conftest import assert_close, assert_low_precision_ok
from tec_fast import ops
from tec_fast.ops import reference

SHAPES = [  # B, L, C, K: odd C, prime L, K = 1, B = 1, K = L (nothing masked)
    (3, 13, 37, 4),
    (1, 7, 16, 1),
    (2, 5, 600, 5),  # C over one channel block, no mask token used
]


def _inputs(B, L, C, K, dtype, seed=0, with_pos=True):
    g = torch.Generator().manual_seed(seed)
    vis = torch.randn(B, K, C, generator=g).to(dtype).requires_grad_()
    tok = torch.randn(C, generator=g).to(dtype).requires_grad_()
    pos = torch.randn(L, C, generator=g).to(dtype).requires_grad_() if with_pos else None
    ids_restore = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    return vis, ids_restore, tok, pos


def _run(fn, vis, ids, tok, pos, grad):
    out = fn(vis, ids, tok, pos)
    leaves = [vis, tok] + ([pos] if pos is not None else [])
    return (out, *torch.autograd.grad(out, leaves, grad))


NAMES = ["out", "grad_vis", "grad_mask_token", "grad_pos"]


def _assert_matches_reference(vis, ids, tok, pos, grad):
    """The op's output and every gradient against the reference's (dtype and values), fp32."""
    got = _run(ops.scatter_masked, vis, ids, tok, pos, grad)
    want = _run(reference.scatter_masked, vis, ids, tok, pos, grad)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype, name
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_pos", [True, False])
def test_fp32_matches_reference(triton_path, shape, with_pos):
    B, L, C, K = shape
    vis, ids, tok, pos = _inputs(*shape, torch.float32, with_pos=with_pos)
    assert ops.why_not_fast("scatter_masked", vis) == []
    grad = torch.randn(B, L, C)
    _assert_matches_reference(vis, ids, tok, pos, grad)


def test_batch_split_across_programs(triton_path, monkeypatch):
    # few target programs: each backward program loops over several images of the batch
    import tec_fast.kernels.scatter_masked as km
    monkeypatch.setattr(km, "_TARGET_PROGRAMS", 2)
    vis, ids, tok, pos = _inputs(5, 11, 24, 3, torch.float32)
    grad = torch.randn(5, 11, 24)
    _assert_matches_reference(vis, ids, tok, pos, grad)


def test_non_permutation_indices(triton_path):
    vis, _, tok, pos = _inputs(2, 6, 10, 3, torch.float32)
    ids = torch.tensor([[0, 0, 5, 2, 2, 4], [1, 1, 1, 1, 1, 1]])  # repeats: grads accumulate
    grad = torch.randn(2, 6, 10)
    _assert_matches_reference(vis, ids, tok, pos, grad)


def test_repeats_across_scan_blocks(triton_path):
    """The backward finds each grad_vis row's sources by scanning ids_restore in blocks (64 at a
    time): repeats spread over many blocks add up."""
    g = torch.Generator().manual_seed(4)
    L, K, C = 700, 300, 3
    vis, _, tok, pos = _inputs(2, L, C, K, torch.float32)
    ids = torch.randint(0, L, (2, L), generator=g)
    ids[1, [1, 350, 699]] = 7  # one row of grad_vis fed from every block
    _assert_matches_reference(vis, ids, tok, pos, torch.randn(2, L, C, generator=g))


def test_bf16_error_within_budget(triton_path):
    B, L, C, K = 3, 13, 37, 4
    vis, ids, tok, pos = _inputs(B, L, C, K, torch.bfloat16)
    grad = torch.randn(B, L, C).bfloat16()
    got = _run(ops.scatter_masked, vis, ids, tok, pos, grad)
    eager = _run(reference.scatter_masked, vis, ids, tok, pos, grad)
    f32 = [t.detach().float().requires_grad_() for t in (vis, tok, pos)]
    exact = _run(reference.scatter_masked, f32[0], ids, f32[1], f32[2], grad.float())
    for name, a, e, r in zip(NAMES, got, eager, exact):
        assert a.dtype == torch.bfloat16, name
        assert_low_precision_ok(a, e, r, atol=1e-2, name=name)


def test_mask_token_of_other_dtype(triton_path):
    vis, ids, _, pos = _inputs(2, 7, 8, 3, torch.bfloat16)
    tok = torch.randn(1, 1, 8, requires_grad=True)  # fp32 and MAE's [1, 1, C] parameter shape
    got = _run(ops.scatter_masked, vis, ids, tok, pos, torch.ones(2, 7, 8, dtype=torch.bfloat16))
    want = _run(reference.scatter_masked, vis, ids, tok.reshape(8), pos,
                torch.ones(2, 7, 8, dtype=torch.bfloat16))
    assert got[2].shape == (1, 1, 8) and got[2].dtype == torch.float32
    assert_close(got[0], want[0], atol=0, rtol=0, name="out")
    assert_close(got[2].reshape(8), want[2], atol=1e-2, rtol=1e-2, name="grad_mask_token")


def test_kernel_never_reads_out_of_bounds(triton_path, monkeypatch):
    from tec_fast.kernels import scatter_masked as kernel
    fast = kernel.scatter_masked
    monkeypatch.setattr(kernel, "check_index_flag", lambda *a: None)  # the error after the launch, off
    vis, _, tok, pos = _inputs(1, 4, 8, 2, torch.float32)
    out = fast(vis, torch.tensor([[1, -3, 9, 3]]), tok, pos)  # bad rows: pos only
    assert_close(out[0, 0], vis[0, 1] + pos[0], atol=0, rtol=0, name="row 0")
    assert_close(out[0, 1:3], pos[1:3], atol=0, rtol=0, name="bad rows")
    assert_close(out[0, 3], tok + pos[3], atol=0, rtol=0, name="row 3")


@pytest.mark.parametrize("case, match", [
    (lambda v, i, t, p: (v[0], i, t, p), "vis must be 3-D"),
    (lambda v, i, t, p: (v, i[:, :2], t, p), "ids_restore has L=2 columns, fewer than the K=4"),
    (lambda v, i, t, p: (v, i + 1, t, p), r"ids_restore holds indices .* outside \[0, 13\)"),
    (lambda v, i, t, p: (v, i[:2], t, p), r"ids_restore must have shape \(3, 13\)"),
    (lambda v, i, t, p: (v, i, t[:-1], p), "mask_token must hold C=37 values"),
    (lambda v, i, t, p: (v, i, t.long(), p), "mask_token must be floating point"),
    (lambda v, i, t, p: (v, i, t, p[:, :-1]), r"pos must have shape \(13, 37\)"),
])
def test_validation(case, match):
    vis, ids, tok, pos = (t.detach() if t.is_floating_point() else t
                          for t in _inputs(3, 13, 37, 4, torch.float32))
    with pytest.raises(ValueError, match=match):
        ops.scatter_masked(*case(vis, ids, tok, pos))


def test_opcheck(triton_path):
    vis, ids, tok, pos = (t.detach() for t in _inputs(2, 7, 9, 3, torch.float32))  # launcher op: no autograd
    torch.library.opcheck(torch.ops.tec_fast.scatter_masked.default, (vis, ids, tok, pos))
    torch.library.opcheck(torch.ops.tec_fast.scatter_masked.default, (vis, ids, tok, None))


def test_compile_smoke(triton_path):
    vis, ids, tok, pos = _inputs(2, 7, 9, 3, torch.float32)
    fn = torch.compile(lambda *a: ops.scatter_masked(*a).square().sum(), backend="aot_eager",
                       fullgraph=True)
    loss = fn(vis, ids, tok, pos)
    got = torch.autograd.grad(loss, (vis, tok, pos))
    ref = reference.scatter_masked(vis, ids, tok, pos).square().sum()
    want = torch.autograd.grad(ref, (vis, tok, pos))
    assert_close(loss, ref, atol=1e-4, rtol=1e-6, name="loss")
    for name, a, b in zip(NAMES[1:], got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-6, name=name)


@pytest.mark.parametrize("frozen", ["vis", "mask_token", "pos"])
def test_gradients_of_the_inputs_that_ask_for_one(triton_path, frozen):
    """Only some inputs require a gradient (a frozen encoder's tokens under a trained mask token,
    and so on): the others still get theirs, equal to the reference's."""
    vis, ids, tok, pos = _inputs(3, 13, 37, 4, torch.float32)
    tensors = {"vis": vis, "mask_token": tok, "pos": pos}
    tensors[frozen] = tensors[frozen].detach()
    leaves = [t for name, t in tensors.items() if name != frozen]
    grad = torch.randn(3, 13, 37)
    args = (tensors["vis"], ids, tensors["mask_token"], tensors["pos"])
    got = torch.autograd.grad(ops.scatter_masked(*args), leaves, grad)
    want = torch.autograd.grad(reference.scatter_masked(*args), leaves, grad)
    for name, a, b in zip([n for n in tensors if n != frozen], got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"grad of {name}")
