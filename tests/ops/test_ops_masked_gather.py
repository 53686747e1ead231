"""masked_gather: Triton (interpreter on CPU) vs the plain-torch reference."""
import pytest
import torch

from conftest import assert_close, assert_low_precision_ok
from tec_fast import ops
from tec_fast.ops import reference

SHAPES = [  # B, L, C, K: odd C, prime L, K = 1, B = 1, rows not a multiple of the block
    (2, 13, 37, 5),
    (1, 7, 16, 1),
    (3, 17, 1030, 4),  # C over one channel block
]


def _inputs(B, L, C, K, dtype, seed=0, with_pos=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, C, generator=g).to(dtype).requires_grad_()
    pos = torch.randn(L, C, generator=g).to(dtype).requires_grad_() if with_pos else None
    ids = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B)])
    return x, ids, pos


def _run(fn, x, ids, pos, grad):
    out = fn(x, ids, pos)
    leaves = [x] + ([pos] if pos is not None else [])
    return (out, *torch.autograd.grad(out, leaves, grad))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_pos", [True, False])
def test_fp32_matches_reference(triton_path, shape, with_pos):
    x, ids, pos = _inputs(*shape, torch.float32, with_pos=with_pos)
    assert ops.why_not_fast("masked_gather", x) == []
    grad = torch.randn(shape[0], shape[3], shape[2])
    got = _run(ops.masked_gather, x, ids, pos, grad)
    want = _run(reference.masked_gather, x, ids, pos, grad)
    for name, a, b in zip(["out", "grad_x", "grad_pos"], got, want):
        assert a.dtype == b.dtype, name
        assert_close(a, b, atol=1e-6, rtol=1e-6, name=name)


def test_repeated_indices_accumulate(triton_path):
    x, _, pos = _inputs(2, 9, 12, 4, torch.float32)
    ids = torch.tensor([[3, 3, 0, 3], [8, 1, 1, 2]])
    grad = torch.randn(2, 4, 12)
    got = _run(ops.masked_gather, x, ids, pos, grad)
    want = _run(reference.masked_gather, x, ids, pos, grad)
    for name, a, b in zip(["out", "grad_x", "grad_pos"], got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=name)


def test_repeats_across_scan_blocks(triton_path):
    """The backward finds each row's sources by scanning ids_keep in blocks (``match_block``: 32
    at a time): repeats spread over many blocks add up, against float64."""
    g = torch.Generator().manual_seed(3)
    L, K, C = 700, 600, 3
    ids = torch.randint(0, L, (2, K), generator=g)
    ids[0, [0, 300, 599]] = 5  # one row fed from every block
    x64, pos64 = torch.randn(2, L, C, dtype=torch.float64, generator=g), torch.randn(L, C, dtype=torch.float64)
    grad64 = torch.randn(2, K, C, dtype=torch.float64, generator=g)
    x, pos = x64.float().requires_grad_(), pos64.float().requires_grad_()
    got = _run(ops.masked_gather, x, ids, pos, grad64.float())
    want = _run(reference.masked_gather, x64.requires_grad_(), ids, pos64.requires_grad_(), grad64)
    for name, a, b in zip(["out", "grad_x", "grad_pos"], got, want):
        assert_close(a, b.float(), atol=2e-5, rtol=1e-5, name=name)


def test_batch_split_across_programs(triton_path, monkeypatch):
    # few target programs: each backward program walks several images of the batch
    import tec_fast.kernels.masked_gather as km
    monkeypatch.setattr(km, "_TARGET_PROGRAMS", 2)
    x, ids, pos = _inputs(5, 11, 24, 3, torch.float32)
    grad = torch.randn(5, 3, 24)
    got = _run(ops.masked_gather, x, ids, pos, grad)
    want = _run(reference.masked_gather, x, ids, pos, grad)
    for name, a, b in zip(["out", "grad_x", "grad_pos"], got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=name)


def test_bf16_error_within_budget(triton_path):
    B, L, C, K = 2, 13, 37, 5
    x, ids, pos = _inputs(B, L, C, K, torch.bfloat16)
    grad = torch.randn(B, K, C).bfloat16()
    got = _run(ops.masked_gather, x, ids, pos, grad)
    eager = _run(reference.masked_gather, x, ids, pos, grad)  # the reference is eager bf16 here
    x32, pos32 = x.detach().float().requires_grad_(), pos.detach().float().requires_grad_()
    exact = _run(reference.masked_gather, x32, ids, pos32, grad.float())
    for name, a, e, r in zip(["out", "grad_x", "grad_pos"], got, eager, exact):
        assert a.dtype == torch.bfloat16, name
        assert_low_precision_ok(a, e, r, atol=1e-2, name=name)


def test_mixed_dtypes_promote_like_reference(triton_path):
    x, ids, _ = _inputs(2, 13, 37, 5, torch.bfloat16)
    pos = torch.randn(13, 37, requires_grad=True)
    out = ops.masked_gather(x, ids, pos)
    assert out.dtype == reference.masked_gather(x, ids, pos).dtype == torch.float32
    gx, gp = torch.autograd.grad(out.sum(), (x, pos))
    assert gx.dtype == torch.bfloat16 and gp.dtype == torch.float32


def test_int32_indices(triton_path):
    x, ids, pos = _inputs(2, 13, 37, 5, torch.float32)
    assert_close(ops.masked_gather(x, ids.int(), pos), reference.masked_gather(x, ids, pos),
                 atol=0, rtol=0, name="out")


def test_kernel_never_reads_out_of_bounds(triton_path, monkeypatch):
    from tec_fast.kernels import masked_gather as kernel
    fast = kernel.masked_gather
    monkeypatch.setattr(kernel, "check_index_flag", lambda *a: None)  # the error after the launch, off
    x, ids, pos = _inputs(1, 5, 8, 3, torch.float32)
    bad = torch.tensor([[0, 5, -1]])  # bad rows come out zero
    out = fast(x, bad, pos)
    assert_close(out[0, 0], x[0, 0] + pos[0], atol=0, rtol=0, name="row 0")
    assert torch.equal(out[0, 1:], torch.zeros(2, 8))
    gx, gp = torch.autograd.grad(out, (x, pos), torch.ones_like(out))  # bad rows dropped
    assert torch.equal(gx[0, 0], torch.ones(8)) and torch.equal(gx[0, 1:], torch.zeros(4, 8))
    assert torch.equal(gp, gx[0])


@pytest.mark.parametrize("case, match", [
    (lambda x, ids, pos: (x[0], ids, pos), "x must be 3-D"),
    (lambda x, ids, pos: (x, ids[0], pos), "ids_keep must be a 2-D"),
    (lambda x, ids, pos: (x, ids.float(), pos), "ids_keep must be int64 or int32"),
    (lambda x, ids, pos: (x, ids[:1], pos), r"ids_keep must have shape \(2, 5\)"),
    (lambda x, ids, pos: (x, ids + 13, pos), r"ids_keep holds indices .* outside \[0, 13\)"),
    (lambda x, ids, pos: (x, ids - 20, pos), "ids_keep holds indices"),
    (lambda x, ids, pos: (x, ids, pos[:-1]), r"pos must have shape \(13, 37\)"),
    (lambda x, ids, pos: (x.long(), ids, pos), "x must be floating point"),
])
def test_validation(case, match):
    x, ids, pos = _inputs(2, 13, 37, 5, torch.float32)
    with pytest.raises(ValueError, match=match):
        ops.masked_gather(*case(x.detach(), ids, pos.detach()))


def test_opcheck(triton_path):
    x, ids, pos = _inputs(2, 7, 9, 3, torch.float32)
    x, pos = x.detach(), pos.detach()  # the custom op is the launcher; autograd is the Function around it
    torch.library.opcheck(torch.ops.tec_fast.masked_gather.default, (x, ids, pos))
    torch.library.opcheck(torch.ops.tec_fast.masked_gather.default, (x, ids, None))


def test_compile_smoke(triton_path):
    x, ids, pos = _inputs(2, 7, 9, 3, torch.float32)
    fn = torch.compile(lambda x, ids, pos: ops.masked_gather(x, ids, pos).square().sum(),
                       backend="aot_eager", fullgraph=True)
    loss = fn(x, ids, pos)
    gx, gp = torch.autograd.grad(loss, (x, pos))
    ref = reference.masked_gather(x, ids, pos).square().sum()
    rgx, rgp = torch.autograd.grad(ref, (x, pos))
    assert_close(loss, ref, atol=1e-5, rtol=1e-6, name="loss")
    assert_close(gx, rgx, atol=1e-5, rtol=1e-6, name="grad_x")
    assert_close(gp, rgp, atol=1e-5, rtol=1e-6, name="grad_pos")


@pytest.mark.parametrize("frozen", ["x", "pos"])
def test_gradients_of_the_inputs_that_ask_for_one(triton_path, frozen):
    """Only some inputs require a gradient (a frozen patch embedding under a trained position
    table, or the other way round): the others still get theirs, equal to the reference's."""
    x, ids, pos = _inputs(2, 13, 37, 5, torch.float32)
    x, pos = (x.detach(), pos) if frozen == "x" else (x, pos.detach())
    leaf = pos if frozen == "x" else x
    grad = torch.randn(2, 5, 37)
    got = torch.autograd.grad(ops.masked_gather(x, ids, pos), leaf, grad)[0]
    want = torch.autograd.grad(reference.masked_gather(x, ids, pos), leaf, grad)[0]
    assert_close(got, want, atol=1e-6, rtol=1e-6, name=f"grad of {'pos' if frozen == 'x' else 'x'}")
