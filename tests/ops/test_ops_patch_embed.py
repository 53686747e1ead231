"""patch_embed: the patch gather + GEMM path (Triton interpreter on CPU) vs the reference
convolution: values and the weight and bias gradients, fp32 and bf16 autocast, awkward shapes."""
import pytest
import torch

from conftest import assert_close, assert_low_precision_ok
from tec_fast import ops
from tec_fast.ops import reference

# B, C, H, W, p, D: one-pixel patches, a single patch, non-square images, odd widths
SHAPES = [(1, 1, 4, 4, 2, 5), (2, 3, 12, 6, 3, 7), (3, 3, 8, 8, 8, 16), (2, 2, 3, 5, 1, 9), (2, 3, 32, 32, 16, 24)]


def _inputs(B, C, H, W, p, D, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, C, H, W, generator=g)
    w = (torch.randn(D, C, p, p, generator=g) * 0.3).requires_grad_()
    b = torch.randn(D, generator=g).requires_grad_() if bias else None
    return images, w, b


def _run(fn, images, w, b, autocast_dtype=None):
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = fn(images, w, b)
    leaves = [w] + ([b] if b is not None else [])
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=g).to(out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_reference(triton_path, shape, bias):
    images, w, b = _inputs(*shape, bias=bias)
    assert ops.why_not_fast("patch_embed", images) == []
    got = _run(ops.patch_embed, images, w, b)
    ref = _run(reference.patch_embed, images, w, b)
    assert got[0].is_contiguous() and got[0].shape == ref[0].shape
    for name, a, e in zip(("out", "grad_weight", "grad_bias"), got, ref):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_bf16_autocast(triton_path, shape):
    """fp32 images and weights under bf16 autocast, as the new model trains: the gather writes
    bf16 patches; errors within twice those of the eager convolution under the same autocast."""
    images, w, b = _inputs(*shape)
    got = _run(ops.patch_embed, images, w, b, torch.bfloat16)
    eager = _run(reference.patch_embed, images, w, b, torch.bfloat16)
    exact = _run(reference.patch_embed, images.double(), w.double(), b.double())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for name, a, e, x in zip(("out", "grad_weight", "grad_bias"), got, eager, exact):
        assert_low_precision_ok(a, e, x, atol=1e-2, name=name)


def test_bf16_weights_without_autocast(triton_path):
    """A frozen base cast to bf16 takes bf16 images and returns bf16 outputs."""
    images, w, b = _inputs(2, 3, 12, 12, 4, 10)
    w16, b16 = w.detach().bfloat16(), b.detach().bfloat16()
    with torch.no_grad():
        got = ops.patch_embed(images.bfloat16(), w16, b16)
        eager = reference.patch_embed(images.bfloat16(), w16, b16)
        exact = reference.patch_embed(images.bfloat16().double(), w16.double(), b16.double())
    assert got.dtype == torch.bfloat16
    assert_low_precision_ok(got, eager, exact, atol=1e-2, name="out")


def test_strided_images_read_in_place(triton_path):
    images, w, b = _inputs(2, 3, 8, 8, 4, 6)
    for strided in (images.contiguous(memory_format=torch.channels_last), images.transpose(2, 3)):
        assert_close(_run(ops.patch_embed, strided, w, b)[0], _run(reference.patch_embed, strided, w, b)[0],
                     atol=1e-5, rtol=1e-5, name="out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_images_that_need_a_gradient_get_it(triton_path, dtype):
    """Images that require a gradient get the convolution's input gradient (the patches'
    gradient put back in place), in their own dtype."""
    images, w, b = _inputs(2, 3, 8, 12, 4, 6)
    images = images.to(dtype).requires_grad_()
    assert not ops.why_not_fast("patch_embed", images)
    grad = torch.randn(2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = ops.patch_embed(images, w, b)
    (gi,) = torch.autograd.grad(out, images, grad.to(out.dtype))
    exact = images.detach().double().requires_grad_()
    (ri,) = torch.autograd.grad(reference.patch_embed(exact, w.double(), b.double()), exact,
                                grad.to(out.dtype).double())
    assert gi.dtype == dtype
    assert_close(gi, ri, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5 if dtype == torch.float32 else 2e-2,
                 name="grad_images")


def test_cpu_default_is_the_convolution_bitwise():
    """Without a forced path, CPU runs the reference: exactly the nn.Conv2d the models used."""
    from tec_fast.models.layers import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(4, 3, 8)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(pe(x), pe.proj(x).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("args, match", [
    (((2, 3, 8, 8), (6, 2, 4, 4), 6), "images have 3 channels"),
    (((2, 3, 9, 8), (6, 3, 4, 4), 6), "9x8 pixels do not split into 4x4 patches"),
    (((2, 3, 0, 0), (6, 3, 4, 4), 6), "0x0 pixels do not split into 4x4 patches"),
    (((2, 3, 8, 8), (6, 3, 4, 2), 6), "square patches"),
    (((2, 3, 8, 8), (6, 3, 4, 4), 5), r"bias must have shape \(6,\)"),
    (((3, 8, 8), (6, 3, 4, 4), 6), "images"),
])
def test_errors_name_the_argument(args, match):
    images, w, nb = args
    with pytest.raises(ValueError, match=match):
        ops.patch_embed(torch.zeros(images), torch.zeros(w), torch.zeros(nb))


def test_opcheck(triton_path):
    import tec_fast.kernels.patch_embed  # noqa: F401  (registers the op)
    images = torch.randn(2, 3, 8, 12)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.tec_fast.patchify.default, (images, 4, dtype))


def test_compile_smoke(triton_path):
    images, w, b = _inputs(2, 3, 8, 8, 4, 6)
    fn = torch.compile(lambda *a: ops.patch_embed(*a).square().sum(), backend="aot_eager", fullgraph=True)
    out = fn(images, w, b)
    assert_close(out, reference.patch_embed(images, w, b).square().sum(), atol=1e-4, rtol=1e-5, name="out")
