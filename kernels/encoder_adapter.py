"""encoder_adapter: TEC's encoder adapter (SPEC.md §2) over the stacked block outputs [D, B, T, C].

    Z' = LN_{D*C}(concat_d feats[d])          G groups of M = D/G blocks
    u_g = Z'[chunk g] W_g^T + b_g;  u_g += fc2_g(GELU(fc1_g(u_g)));  out = LN_C(sum_g u_g)

The encoder writes its block outputs into one [D, B, T, C] buffer, so the concatenation along
channels is never materialised:
- ``_adapter_ln_in_fwd_kernel``: one program per token reads its D x C values straight from the
  buffer, normalises them in fp32 and writes the G chunks as [G, B*T, M*C], the operand layout
  of one batched GEMM (``baddbmm``) for all G fuse layers.
- the G MLPs are batched GEMMs too (torch; cuBLAS is hard to beat on these shapes).
- ``_adapter_ln_out_fwd_kernel``: residual add, group sum and the final LayerNorm in one pass.
Backward: ``_adapter_ln_out_bwd_kernel`` (LN_C backward + per-program partial sums for its
weight/bias), batched GEMMs for the MLPs and fuse layers, and ``_adapter_ln_in_bwd_kernel``
(LN_{D*C} backward written straight back in the [D, B, T, C] layout). The normalised input Z' is
not kept for backward: that kernel recomputes it in registers and writes it over the incoming
gradient buffer it has just consumed, ready for the fuse layers' weight gradient.
Under autocast the GEMMs run in the autocast dtype and the output dtype is the one the reference
gets (fp32 on CUDA); LayerNorm statistics are fp32 always.
Reference: ``tec_fast.ops.reference.encoder_adapter``.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tec_fast.kernels._common import unit_last_stride


@triton.jit
def _adapter_ln_in_fwd_kernel(x_ptr, w_ptr, b_ptr, z_ptr, mean_ptr, rstd_ptr,
                              BT, T, D, C, M, eps, stride_xd, stride_xb, stride_xt,
                              BLOCK_DEPTH: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    dd = tl.arange(0, BLOCK_DEPTH).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    ok = (dd < D)[:, None] & (cc < C)[None, :]
    x = tl.load(x_ptr + dd[:, None] * stride_xd + (row // T) * stride_xb + (row % T) * stride_xt + cc[None, :],
                mask=ok, other=0.0).to(tl.float32)
    n = D * C
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
    xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(xc * xc, axis=1), axis=0) / n + eps)
    w = tl.load(w_ptr + dd[:, None] * C + cc[None, :], mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + dd[:, None] * C + cc[None, :], mask=ok, other=0.0).to(tl.float32)
    z = xc * rstd * w + b
    # block d goes to group d // M at channel offset (d % M) * C: z is [G, BT, M*C]
    z_off = (dd // M)[:, None] * BT * M * C + row * M * C + (dd % M)[:, None] * C + cc[None, :]
    tl.store(z_ptr + z_off, z.to(z_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _adapter_ln_in_bwd_kernel(x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dz_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                              BT, T, D, C, M, stride_xd, stride_xb, stride_xt,
                              BLOCK_DEPTH: tl.constexpr, BLOCK_C: tl.constexpr):
    # dz_ptr holds dL/dZ' as [G, BT, M*C]; each row's slots are overwritten with Z' once read.
    pid = tl.program_id(0)
    dd = tl.arange(0, BLOCK_DEPTH).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    ok = (dd < D)[:, None] & (cc < C)[None, :]
    w = tl.load(w_ptr + dd[:, None] * C + cc[None, :], mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + dd[:, None] * C + cc[None, :], mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_DEPTH, BLOCK_C), tl.float32)
    db = tl.zeros((BLOCK_DEPTH, BLOCK_C), tl.float32)
    n = D * C
    for row in range(pid, BT, tl.num_programs(0)):
        x = tl.load(x_ptr + dd[:, None] * stride_xd + (row // T) * stride_xb + (row % T) * stride_xt + cc[None, :],
                    mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (x - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
        z_off = (dd // M)[:, None] * BT * M * C + row * M * C + (dd % M)[:, None] * C + cc[None, :]
        dz = tl.load(dz_ptr + z_off, mask=ok, other=0.0).to(tl.float32)
        dw += dz * xhat
        db += dz
        dxhat = dz * w
        c1 = tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0) / n
        c2 = tl.sum(tl.sum(dxhat, axis=1), axis=0) / n
        dx = (dxhat - xhat * c1 - c2) * tl.load(rstd_ptr + row)
        tl.store(dx_ptr + dd[:, None] * (BT * C) + row * C + cc[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dz_ptr + z_off, (xhat * w + b).to(dz_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_part_ptr + pid * n + dd[:, None] * C + cc[None, :], dw, mask=ok)
    tl.store(db_part_ptr + pid * n + dd[:, None] * C + cc[None, :], db, mask=ok)


@triton.jit
def _adapter_ln_out_fwd_kernel(u_ptr, y_ptr, w_ptr, b_ptr, out_ptr, s_ptr, mean_ptr, rstd_ptr,
                               BT, G, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    ok = cc < C
    s = tl.zeros((BLOCK_C,), tl.float32)
    for g in range(G):  # sum_g (u_g + MLP_g(u_g))
        off = (g * BT + row) * C + cc
        s += tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
        s += tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(s, axis=0) / C
    sc = tl.where(ok, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(sc * sc, axis=0) / C + eps)
    w = tl.load(w_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * C + cc, (sc * rstd * w + b).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row * C + cc, s, mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _adapter_ln_out_bwd_kernel(dout_ptr, s_ptr, mean_ptr, rstd_ptr, w_ptr, ds_ptr, dw_part_ptr, db_part_ptr,
                               BT, C, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cc = tl.arange(0, BLOCK_C)
    ok = cc < C
    w = tl.load(w_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for row in range(pid, BT, tl.num_programs(0)):
        s = tl.load(s_ptr + row * C + cc, mask=ok, other=0.0)
        xhat = tl.where(ok, (s - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
        dy = tl.load(dout_ptr + row * C + cc, mask=ok, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        dxhat = dy * w
        c1 = tl.sum(dxhat * xhat, axis=0) / C
        c2 = tl.sum(dxhat, axis=0) / C
        ds = (dxhat - xhat * c1 - c2) * tl.load(rstd_ptr + row)
        tl.store(ds_ptr + row * C + cc, ds.to(ds_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_part_ptr + pid * C + cc, dw, mask=ok)
    tl.store(db_part_ptr + pid * C + cc, db, mask=ok)


def _ln_in_config(D: int, C: int) -> Tuple[int, int, int]:
    # one token's whole D x C tile lives in registers: ~32 fp32 values per thread and tile
    block_depth, block_c = triton.next_power_of_2(D), triton.next_power_of_2(C)
    num_warps = min(16, max(4, block_depth * block_c // 1024))
    return block_depth, block_c, num_warps


def _reduction_programs(rows: int, device: torch.device) -> int:
    """Programs for the LayerNorm backward kernels: enough to fill the GPU, few enough that the
    per-program partial sums of the weight gradients stay small."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))


def _adapter_fwd(feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b,
                 ln_after_w, ln_after_b, eps_before, eps_after, gemm_dtype, out_dtype):
    D, B, T, C = feats.shape
    G = fuse_w.shape[0]
    M = D // G
    BT = B * T
    dev = feats.device
    feats = unit_last_stride(feats)
    z = torch.empty((G, BT, M * C), dtype=gemm_dtype, device=dev)  # LN_{D*C}(Z), grouped
    mean_in = torch.empty((BT,), dtype=torch.float32, device=dev)
    rstd_in = torch.empty((BT,), dtype=torch.float32, device=dev)
    block_depth, block_c, num_warps = _ln_in_config(D, C)
    _adapter_ln_in_fwd_kernel[(BT,)](
        feats, ln_before_w.contiguous(), ln_before_b.contiguous(), z, mean_in, rstd_in,
        BT, T, D, C, M, eps_before, feats.stride(0), feats.stride(1), feats.stride(2),
        BLOCK_DEPTH=block_depth, BLOCK_C=block_c, num_warps=num_warps)
    gd = gemm_dtype
    u = torch.baddbmm(fuse_b.to(gd).unsqueeze(1), z, fuse_w.to(gd).transpose(1, 2))   # [G, BT, C]
    h_pre = torch.baddbmm(fc1_b.to(gd).unsqueeze(1), u, fc1_w.to(gd).transpose(1, 2))  # [G, BT, Hd]
    y = torch.baddbmm(fc2_b.to(gd).unsqueeze(1), F.gelu(h_pre), fc2_w.to(gd).transpose(1, 2))  # [G, BT, C]
    out = torch.empty((BT, C), dtype=out_dtype, device=dev)
    s = torch.empty((BT, C), dtype=torch.float32, device=dev)  # sum_g (u_g + y_g), for backward
    mean_out = torch.empty((BT,), dtype=torch.float32, device=dev)
    rstd_out = torch.empty((BT,), dtype=torch.float32, device=dev)
    _adapter_ln_out_fwd_kernel[(BT,)](
        u, y, ln_after_w.contiguous(), ln_after_b.contiguous(), out, s, mean_out, rstd_out,
        BT, G, C, eps_after, BLOCK_C=triton.next_power_of_2(C), num_warps=4)
    return out.view(B, T, C), mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out


def _adapter_bwd(grad_out, feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w, ln_after_w,
                 mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out):
    D, B, T, C = feats.shape
    G = fuse_w.shape[0]
    M = D // G
    BT = B * T
    dev, gd = feats.device, u.dtype
    feats = unit_last_stride(feats)
    f32 = dict(dtype=torch.float32, device=dev)

    # final LayerNorm: d(sum_g ...) is the same for every group's residual branch
    n_prog = _reduction_programs(BT, dev)
    ds = torch.empty((BT, C), dtype=gd, device=dev)
    dw_part, db_part = torch.empty((n_prog, C), **f32), torch.empty((n_prog, C), **f32)
    _adapter_ln_out_bwd_kernel[(n_prog,)](
        grad_out.contiguous(), s, mean_out, rstd_out, ln_after_w.contiguous(), ds, dw_part, db_part,
        BT, C, BLOCK_C=triton.next_power_of_2(C), num_warps=4)
    d_ln_after_w, d_ln_after_b = dw_part.sum(0), db_part.sum(0)

    # the G residual MLPs
    d_fc2_b = ds.float().sum(0).repeat(G, 1)
    d_fc2_w = torch.matmul(ds.t(), F.gelu(h_pre))                      # [G, C, Hd]
    dh_pre = torch.ops.aten.gelu_backward(torch.matmul(ds, fc2_w.to(gd)), h_pre)  # [G, BT, Hd]
    d_fc1_w = torch.bmm(dh_pre.transpose(1, 2), u)                     # [G, Hd, C]
    d_fc1_b = dh_pre.float().sum(1)
    du = torch.baddbmm(ds.unsqueeze(0), dh_pre, fc1_w.to(gd))          # [G, BT, C]
    d_fuse_b = du.float().sum(1)

    # fuse layers and the first LayerNorm; the kernel turns dz into z in place
    zbuf = torch.bmm(du, fuse_w.to(gd))                                # dL/dZ' [G, BT, M*C]
    block_depth, block_c, num_warps = _ln_in_config(D, C)
    n_prog = _reduction_programs(BT, dev)
    d_feats = torch.empty((D, B, T, C), dtype=feats.dtype, device=dev)
    dw_part, db_part = torch.empty((n_prog, D * C), **f32), torch.empty((n_prog, D * C), **f32)
    _adapter_ln_in_bwd_kernel[(n_prog,)](
        feats, ln_before_w.contiguous(), ln_before_b.contiguous(), mean_in, rstd_in, zbuf, d_feats,
        dw_part, db_part, BT, T, D, C, M, feats.stride(0), feats.stride(1), feats.stride(2),
        BLOCK_DEPTH=block_depth, BLOCK_C=block_c, num_warps=num_warps)
    d_fuse_w = torch.bmm(du.transpose(1, 2), zbuf)                     # [G, C, M*C]
    return (d_feats, dw_part.sum(0), db_part.sum(0), d_fuse_w, d_fuse_b, d_fc1_w, d_fc1_b,
            d_fc2_w, d_fc2_b, d_ln_after_w, d_ln_after_b)


# ---- torch.library registration (so torch.compile traces the op) ---------------------------

_T = torch.Tensor
_Forward = Tuple[_T, _T, _T, _T, _T, _T, _T, _T]  # out, then what backward needs
_Grads = Tuple[_T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T]  # one per tensor input
Params = Union[Sequence[torch.Tensor], torch.Tensor]


@torch.library.custom_op("tec_fast::encoder_adapter", mutates_args=())
def _encoder_adapter_op(feats: torch.Tensor, ln_before_w: torch.Tensor, ln_before_b: torch.Tensor,
                        fuse_w: torch.Tensor, fuse_b: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor,
                        fc2_w: torch.Tensor, fc2_b: torch.Tensor, ln_after_w: torch.Tensor,
                        ln_after_b: torch.Tensor, eps_before: float, eps_after: float,
                        gemm_dtype: torch.dtype, out_dtype: torch.dtype) -> _Forward:
    with torch.autocast(feats.device.type, enabled=False):
        return _adapter_fwd(feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b,
                            ln_after_w, ln_after_b, eps_before, eps_after, gemm_dtype, out_dtype)


@_encoder_adapter_op.register_fake
def _(feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_after_w, ln_after_b,
      eps_before, eps_after, gemm_dtype, out_dtype):
    D, B, T, C = feats.shape
    G, Hd = fc1_w.shape[0], fc1_w.shape[1]
    BT = B * T
    f32 = dict(dtype=torch.float32)
    return (feats.new_empty((B, T, C), dtype=out_dtype), feats.new_empty((BT,), **f32),
            feats.new_empty((BT,), **f32), feats.new_empty((G, BT, C), dtype=gemm_dtype),
            feats.new_empty((G, BT, Hd), dtype=gemm_dtype), feats.new_empty((BT, C), **f32),
            feats.new_empty((BT,), **f32), feats.new_empty((BT,), **f32))


@torch.library.custom_op("tec_fast::encoder_adapter_backward", mutates_args=())
def _encoder_adapter_backward_op(grad_out: torch.Tensor, feats: torch.Tensor, ln_before_w: torch.Tensor,
                                 ln_before_b: torch.Tensor, fuse_w: torch.Tensor, fc1_w: torch.Tensor,
                                 fc2_w: torch.Tensor, ln_after_w: torch.Tensor, mean_in: torch.Tensor,
                                 rstd_in: torch.Tensor, u: torch.Tensor, h_pre: torch.Tensor, s: torch.Tensor,
                                 mean_out: torch.Tensor, rstd_out: torch.Tensor) -> _Grads:
    with torch.autocast(feats.device.type, enabled=False):
        return _adapter_bwd(grad_out, feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w, ln_after_w,
                            mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out)


@_encoder_adapter_backward_op.register_fake
def _(grad_out, feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w, ln_after_w, mean_in, rstd_in,
      u, h_pre, s, mean_out, rstd_out):
    D, B, T, C = feats.shape
    G, Hd = fc1_w.shape[0], fc1_w.shape[1]
    gd, f32 = u.dtype, torch.float32
    e = feats.new_empty
    return (e(feats.shape), e((D * C,), dtype=f32), e((D * C,), dtype=f32), e(fuse_w.shape, dtype=gd),
            e((G, C), dtype=f32), e((G, Hd, C), dtype=gd), e((G, Hd), dtype=f32), e((G, C, Hd), dtype=gd),
            e((G, C), dtype=f32), e((C,), dtype=f32), e((C,), dtype=f32))


def _setup_context(ctx, inputs, output):
    (feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_after_w, ln_after_b,
     *_) = inputs
    _, mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out = output
    ctx.mark_non_differentiable(mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out)
    ctx.save_for_backward(feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w, ln_after_w,
                          mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out)
    ctx.param_dtypes = [t.dtype for t in inputs[:11]]


def _backward(ctx, grad_out, *_unused):
    (feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w, ln_after_w,
     mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out) = ctx.saved_tensors
    grads = _encoder_adapter_backward_op(grad_out, feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w,
                                         ln_after_w, mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out)
    grads = [g.to(dt) if need else None
             for g, dt, need in zip(grads, ctx.param_dtypes, ctx.needs_input_grad)]
    return (*grads, None, None, None, None)


_encoder_adapter_op.register_autograd(_backward, setup_context=_setup_context)


def _stacked(ts: Params) -> torch.Tensor:
    return ts if isinstance(ts, torch.Tensor) else torch.stack(list(ts))


def encoder_adapter(feats: torch.Tensor, ln_before_w: torch.Tensor, ln_before_b: torch.Tensor,
                    fuse_w: Params, fuse_b: Params, fc1_w: Params, fc1_b: Params,
                    fc2_w: Params, fc2_b: Params, ln_after_w: torch.Tensor, ln_after_b: torch.Tensor,
                    eps_before: float, eps_after: float) -> torch.Tensor:
    """Triton path of ``tec_fast.ops.reference.encoder_adapter`` (same arguments): feats
    [D, B, T, C] -> [B, T, C]. Group weights are sequences indexed by g (stacked here; the
    stack's backward hands each parameter its gradient) or already-stacked tensors."""
    dev = feats.device.type
    if torch.is_autocast_enabled(dev):
        # as the reference under autocast: Linear in the autocast dtype; layer_norm is on the
        # fp32 list on CUDA, while on CPU it keeps its (autocast-dtype) input's dtype
        gemm_dtype = torch.get_autocast_dtype(dev)
        out_dtype = torch.float32 if dev == "cuda" else gemm_dtype
    else:
        gemm_dtype = feats.dtype
        out_dtype = torch.promote_types(feats.dtype, ln_after_w.dtype)
    return _encoder_adapter_op(feats, ln_before_w, ln_before_b, _stacked(fuse_w), _stacked(fuse_b),
                               _stacked(fc1_w), _stacked(fc1_b), _stacked(fc2_w), _stacked(fc2_b),
                               ln_after_w, ln_after_b, float(eps_before), float(eps_after),
                               gemm_dtype, out_dtype)[0]
