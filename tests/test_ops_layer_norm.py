"""``tec_fast.ops.layer_norm``: the block LayerNorm with the residual add fused in. The kernel
itself is tested in test_kernel_layer_norm.py; here the public op: validation, both paths give
the same values and gradients, and the ViT block equals its unfused definition."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from tec_fast import ops
from tec_fast.models.layers import Block


def _inputs(rows=7, C=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(rows, C), make(rows, C), make(C), make(C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_path_matches_reference(triton_path, dtype):
    x, res, w, b = _inputs(dtype=dtype)
    gy, gh = torch.randn(7, 24).to(dtype), torch.randn(7, 24).to(dtype)

    def run(fast: bool):
        for t in (x, res, w, b):
            t.grad = None
        if fast:
            y, h = ops.layer_norm(x, w, b, 1e-6, residual=res)
        else:
            y, h = ops.reference.layer_norm(x, w, b, 1e-6, res)
        torch.autograd.backward([y, h], [gy, gh])
        return [y, h] + [t.grad.clone() for t in (x, res, w, b)]

    assert ops.use_fast_path("layer_norm", x, residual_dtype=dtype)
    got, want = run(True), run(False)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=3e-2)
    for name, a, e in zip(("y", "h", "dx", "dres", "dw", "db"), got, want):
        assert_close(a.float(), e.float(), name=name, **tol)


def test_validation_names_the_argument():
    x, res, w, b = _inputs()
    with pytest.raises(ValueError, match=r"weight must have shape \(24,\)"):
        ops.layer_norm(x, w[:5], b)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.layer_norm(x, w, b, residual=res[:3])
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        ops.layer_norm(x.long(), w, b)
    reasons = ops.why_not_fast("layer_norm", torch.empty(2, 8192), residual_dtype=torch.float16)
    assert any("8192" in r for r in reasons) and any("residual dtype" in r for r in reasons)


def test_block_equals_its_unfused_definition():
    torch.manual_seed(0)
    blk = Block(32, 4)
    x = torch.randn(2, 9, 32)
    a = x + blk.attn(F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, 1e-6))
    want = a + blk.mlp(F.layer_norm(a, (32,), blk.norm2.weight, blk.norm2.bias, 1e-6))
    assert_close(blk(x), want, atol=1e-6, rtol=1e-6, name="block")
