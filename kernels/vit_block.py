"""vit_block: one pre-norm ViT block (attention and MLP sublayers) as a single autograd node.

    x_in = x + pending                 (or x alone; ``pending``: the previous block's MLP branch)
    y1   = LN1(x_in)                   (``layer_norm``'s kernel, the add fused in)
    q, k, v = heads(y1 Wqkv^T + bqkv)  (torch F.linear; views into heads)
    a    = attention(q, k, v) Wp^T + bp   (torch's fused attention kernel; F.linear)
    h    = x_in + a,  y2 = LN2(h)      (``layer_norm``'s kernel, the add fused in)
    m    = GELU(y2 W1^T + b1) W2^T + b2   (F.linear, ``mlp``'s GELU kernel, F.linear)

returns (x_in, h, m); the block's output is h + m, which the next block adds inside its LN1.

Why one node: the block's math is a dozen kernels either way (four GEMMs, attention, two
LayerNorms, the GELU), but run as separate ops (``layer_norm`` twice, ``qkv_heads``, ``mlp``) each
is also an autograd node with its own Python wrapper, checks, views and saved-tensor bookkeeping.
Here the forward issues the kernels from one ``autograd.Function`` and the backward is written
out:

    dm -> dW2 = dm^T g, db2, dg = dm W2 -> GELU backward (recomputes g; sums db1) -> dW1, dy2
    dy2, dh -> LN2 backward (the residual's gradient added in) -> dh_total = d(x_in) + da
    da -> dWp, dbp, d(attention out) -> attention backward -> dq, dk, dv
       -> packed into d(qkv) with its column sums (``qkv_heads``' pack kernel) -> dWqkv, dy1
    dy1, dh_total (+ d(x_in) from outside) -> LN1 backward -> dx (= d pending)

It saves what the per-op path saves (x_in, y1, qkv, the attention output and its log-sum-exp,
h, y2, the MLP pre-activation, the LayerNorm statistics), nothing more. A weight that does not
require grad (partial fine-tuning) costs no GEMM in the backward, as in the per-op path.
Attention runs torch's own fused kernels: on CPU the flash kernel; on CUDA the flash kernel for
fp16 / bf16 heads of at most 256 values (multiple of 8) on sm80+, the memory-efficient one for
other heads that are a multiple of 8, and attention written out (softmax in fp32, the
probabilities kept) for the rest.
Under autocast the GEMMs and attention run in the autocast dtype and the LayerNorms and the
residual stream in x's dtype, as the per-op path computes them.

Host cost (``benchmarks/experiments/block_routes.py``, the TEC step with launches skipped, CPU):
the step with its blocks on this node took 0.78-0.81x eager's host time, through torch's own
autograd graph of the block 0.84-0.85x, part by part 0.82-0.86x. The backward issues about 55
torch calls from Python where torch's graph issues its own from C++, so this node saves what the
separate nodes and wrappers cost, not the calls themselves.

Under ``torch.compile`` / a dispatch mode the Triton launchers are called through their custom
ops (``direct_launch``). Reference: ``tec_fast.ops.reference.vit_block``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from tec_fast.kernels._common import (autocast_dtype, autocast_off, direct_launch, dtype_reasons, eager_apply,
                                      first_order)
from tec_fast.kernels.layer_norm import MAX_C, _layer_norm_backward_op, _layer_norm_bwd, layer_norm_forward
from tec_fast.kernels.mlp import _mlp_gelu_backward_op, _mlp_gelu_bwd, _mlp_gelu_fwd, _mlp_gelu_op
from tec_fast.kernels.qkv_heads import _qkv_pack, _qkv_pack_op

# no kernel of its own: the block launches these modules' kernels (the compile gate compiles
# them in those ops' cases)
KERNELS_FROM = ("layer_norm", "mlp", "qkv_heads")

_aten = torch.ops.aten
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


_SM80 = {}  # CUDA device index -> compute capability >= 8.0 (a plain dict: torch.compile traces it)


def _sm80(index: int) -> bool:
    ok = _SM80.get(index)
    if ok is None:
        ok = _SM80[index] = torch.cuda.get_device_capability(index)[0] >= 8
    return ok


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v [B, H, N, d] -> (out [B, H, N, d], what ``_attention_bwd`` needs). Torch's fused
    kernels where they take the heads (CPU: flash; CUDA: flash for fp16 / bf16 heads of at most
    256 values, a multiple of 8, on sm80+; memory-efficient for heads a multiple of 8), else
    attention written out (``_math_attention_fwd``)."""
    if q.device.type == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, ("cpu", lse)
    d = q.shape[-1]
    if d % 8:
        return _math_attention_fwd(q, k, v)
    if q.dtype in _FLASH_DTYPES and d <= 256 and _sm80(q.device.index or 0):
        out, lse, cq, ck, mq, mk, seed, offset, _ = _aten._scaled_dot_product_flash_attention(q, k, v)
        return out, ("flash", lse, cq, ck, mq, mk, seed, offset)
    out, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    return out, ("efficient", lse, seed, offset)


def _attention_bwd(dout: torch.Tensor, q, k, v, out, state) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kind = state[0]
    if kind == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, state[1], 0.0, False)
    if kind == "flash":
        _, lse, cq, ck, mq, mk, seed, offset = state
        return _aten._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, cq, ck, mq, mk, 0.0,
                                                                  False, seed, offset)
    if kind == "math":
        return _math_attention_bwd(dout, q, k, v, state[1])
    _, lse, seed, offset = state
    return _aten._scaled_dot_product_efficient_attention_backward(dout, q, k, v, None, out, lse, seed, offset, 0.0,
                                                                  [True, True, True, False])[:3]


def _math_attention_fwd(q, k, v):
    """softmax(q k^T / sqrt(d)) v with the probabilities P kept (fp32 softmax, as torch's math
    backend computes it for 16-bit inputs): the fallback for heads no fused kernel takes."""
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)).float() * scale, dim=-1).to(q.dtype)
    return torch.matmul(p, v), ("math", p)


def _math_attention_bwd(dout, q, k, v, p):
    """dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)) (computed as rowsum(P * dP)), dQ = dS K * s,
    dK = dS^T Q * s; the softmax's part in fp32."""
    scale = q.shape[-1] ** -0.5
    dp = torch.matmul(dout, v.transpose(-2, -1)).float()
    pf = p.float()
    ds = (pf * (dp - (pf * dp).sum(-1, keepdim=True)) * scale).to(q.dtype)
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-2, -1), q), torch.matmul(p.transpose(-2, -1), dout)


def _cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dt else t.to(dt)


def _forward(x, pending, params, H: int, eps: float, dt: torch.dtype, save: bool):
    """The block on x [B, N, C] (autocast off: ``dt`` is the GEMMs' dtype). Returns
    (x_in, h, m, saved): ``saved``, what the backward needs besides x_in and h, None unless
    ``save``."""
    n1w, n1b, wqkv, bqkv, wp, bp, n2w, n2b, w1, b1, w2, b2 = params
    B, N, C = x.shape
    sd = x.dtype  # the residual stream's dtype
    if pending is None:
        y1, _, s1 = layer_norm_forward(x, None, n1w, n1b, eps, save)
        x_in = x
    else:
        y1, x_in, s1 = layer_norm_forward(_cast(pending, sd), x, n1w, n1b, eps, save)
    rows = B * N
    y1c = _cast(y1, dt).view(rows, C)
    if dt != wqkv.dtype or dt != wp.dtype or dt != w1.dtype or dt != w2.dtype:  # autocast, fp32 weights
        wqkv, wp, w1, w2 = _cast(wqkv, dt), _cast(wp, dt), _cast(w1, dt), _cast(w2, dt)
    if dt != bp.dtype or dt != b1.dtype or dt != b2.dtype or (bqkv is not None and dt != bqkv.dtype):
        bqkv, bp, b1, b2 = (None if b_ is None else _cast(b_, dt) for b_ in (bqkv, bp, b1, b2))
    linear = F.linear  # one call from Python for addmm(b, x, w.t()) on x's rows: the same values
    qkv = linear(y1c, wqkv, bqkv)
    q, k, v = qkv.view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    if save:
        o, att = _attention_fwd(q, k, v)
    else:
        o, att = F.scaled_dot_product_attention(q, k, v), None
    at = o.transpose(1, 2).reshape(rows, C)
    p = linear(at, wp, bp)
    y2, h, s2 = layer_norm_forward(_cast(p, sd).view(B, N, C), x_in, n2w, n2b, eps, save)
    y2c = _cast(y2, dt).view(rows, C)
    pre = linear(y2c, w1, b1)
    g = _mlp_gelu_fwd(pre) if direct_launch() else _mlp_gelu_op(pre)
    m = linear(g, w2, b2).view(B, N, C)
    saved = (y1c, qkv, o, at, y2c, pre, wqkv, wp, w1, w2, s1, s2, att) if save else None
    return x_in, h, m, saved


class _VitBlock(torch.autograd.Function):
    """(x, pending or None, 12 parameters, H, eps, dt) -> (x_in, h, m), or (h, m) without
    ``pending`` (x_in is x itself then)."""

    @staticmethod
    def forward(ctx, x, pending, n1w, n1b, wqkv, bqkv, wp, bp, n2w, n2b, w1, b1, w2, b2, H, eps, dt):
        params = (n1w, n1b, wqkv, bqkv, wp, bp, n2w, n2b, w1, b1, w2, b2)
        with autocast_off(x.device.type):
            x_in, h, m, saved = _forward(x, pending, params, H, eps, dt, True)
        y1c, qkv, o, at, y2c, pre, wqkv_c, wp_c, w1_c, w2_c, s1, s2, att = saved
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x_in, y1c, qkv, o, at, h, y2c, pre, wqkv_c, wp_c, w1_c, w2_c, n1w, n2w)
        ctx.stats, ctx.att, ctx.H, ctx.has_pending = (s1, s2), att, H, pending is not None
        ctx.device_type = x.device.type
        ctx.dtypes = (None if pending is None else pending.dtype, n1b.dtype, wqkv.dtype,
                      None if bqkv is None else bqkv.dtype, wp.dtype, bp.dtype, n2b.dtype,
                      w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        return (x_in, h, m) if pending is not None else (h, m)

    @staticmethod
    @first_order("vit_block")
    def backward(ctx, *grads):
        with autocast_off(ctx.device_type):
            return _VitBlock._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        d_xin, dh, dm = grads if ctx.has_pending else (None, *grads)
        x_in, y1c, qkv, o, at, h, y2c, pre, wqkv, wp, w1, w2, n1w, n2w = ctx.saved_tensors
        if not x_in.is_contiguous():  # x as given (no pending): the LayerNorm backward reads rows
            x_in = x_in.contiguous()
        s1, s2 = ctx.stats
        pend_dt, n1b_dt, wqkv_dt, bqkv_dt, wp_dt, bp_dt, n2b_dt, w1_dt, b1_dt, w2_dt, b2_dt = ctx.dtypes
        B, N, C = x_in.shape
        rows, dt, sd = B * N, wqkv.dtype, x_in.dtype
        direct = direct_launch()
        ln_bwd = _layer_norm_bwd if direct else _layer_norm_backward_op
        # MLP branch
        need = ctx.needs_input_grad  # a frozen weight's GEMM (or bias sum) is skipped
        if dm is not None:
            dm = _cast(dm, dt).reshape(rows, C)
            g, dpre, db1 = (_mlp_gelu_bwd if direct else _mlp_gelu_backward_op)(pre, torch.mm(dm, w2))
            dw2 = _cast(torch.mm(dm.t(), g), w2_dt) if need[12] else None
            db2 = dm.sum(0, dtype=b2_dt) if need[13] else None
            dw1 = _cast(torch.mm(dpre.t(), y2c), w1_dt) if need[10] else None
            db1 = _cast(db1, b1_dt) if need[11] else None
            dy2 = _cast(torch.mm(dpre, w1), sd).view(B, N, C)
        else:
            dw2 = db2 = dw1 = db1 = None
            dy2 = h.new_zeros(h.shape)
        dh = None if dh is None else (dh if dh.is_contiguous() else dh.contiguous())
        dh_tot, dn2w, dn2b = ln_bwd(dy2, dh, h, n2w, s2, n2b_dt)
        # attention branch
        da = _cast(dh_tot, dt).view(rows, C)
        dwp = _cast(torch.mm(da.t(), at), wp_dt) if need[6] else None
        dbp = da.sum(0, dtype=bp_dt) if need[7] else None
        H = ctx.H
        dout = torch.mm(da, wp).view(B, N, H, C // H).transpose(1, 2)
        q, k, v = qkv.view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        dq, dk, dv = _attention_bwd(dout, q, k, v, o, ctx.att)
        dqkv, dbqkv = (_qkv_pack if direct else _qkv_pack_op)(*(t if t.stride(-1) == 1 else t.contiguous()
                                                                for t in (dq, dk, dv)))
        dwqkv = _cast(torch.mm(dqkv.t(), y1c), wqkv_dt) if need[4] else None
        dbqkv = _cast(dbqkv, bqkv_dt) if bqkv_dt is not None and need[5] else None
        dy1 = _cast(torch.mm(dqkv, wqkv), sd).view(B, N, C)
        d_in = dh_tot if d_xin is None else dh_tot + d_xin
        dx, dn1w, dn1b = ln_bwd(dy1, d_in, x_in, n1w, s1, n1b_dt)
        dpending = None if pend_dt is None else _cast(dx, pend_dt)
        return (dx, dpending, dn1w, dn1b, dwqkv, dbqkv, dwp, dbp, dn2w, dn2b, dw1, db1, dw2, db2,
                None, None, None)


_apply = eager_apply(_VitBlock)


def vit_block(x: torch.Tensor, n1w: torch.Tensor, n1b: torch.Tensor, wqkv: torch.Tensor,
              bqkv: Optional[torch.Tensor], wp: torch.Tensor, bp: torch.Tensor, n2w: torch.Tensor,
              n2b: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              num_heads: int, eps: float = 1e-6, pending: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton path of ``tec_fast.ops.vit_block`` (inputs validated there): -> (x_in, h, m)."""
    dev = x.device.type
    dt = autocast_dtype(dev) or x.dtype
    params = (n1w, n1b, wqkv, bqkv, wp, bp, n2w, n2b, w1, b1, w2, b2)
    eps = float(eps)
    if torch.is_grad_enabled() and (x.requires_grad or (pending is not None and pending.requires_grad)
                                    or any(t is not None and t.requires_grad for t in params)):
        out = _apply(x, pending, *params, num_heads, eps, dt)
        return out if pending is not None else (x, *out)
    with autocast_off(dev):  # inference (the frozen base): no node, nothing kept
        return _forward(x, pending, params, num_heads, eps, dt, False)[:3]


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], **_info) -> List[str]:
    """Why this path cannot take x of ``dtype`` / ``shape`` (empty: it can)."""
    reasons = dtype_reasons(dtype)
    if shape and shape[-1] > MAX_C:
        reasons.append(f"width {shape[-1]} > {MAX_C} (the LayerNorm kernels hold one row in registers)")
    return reasons
