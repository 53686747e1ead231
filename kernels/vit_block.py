"""vit_block: one pre-norm ViT block (attention and MLP sublayers) as a single autograd node, every
kernel of it launched from this package.

    x_in = x + pending                 (or x alone; ``pending``: the previous block's MLP branch)
    y1   = LN1(x_in)                   (``layer_norm``'s kernel, the add fused in)
    qkv  = y1 Wqkv^T + bqkv            (GEMM; q, k, v read in place: [B, N, 3, H, d])
    o    = softmax(q k^T / sqrt(d)) v  (flash attention: online softmax, the row log-sum-exp kept)
    h    = x_in + (o Wp^T + bp),  y2 = LN2(h)     (GEMM; ``layer_norm``'s kernel, the add fused in)
    pre  = y2 W1^T + b1,  g = GELU(pre)           (one GEMM, GELU in its epilogue)
    m    = g W2^T + b2                            (GEMM)

returns (x_in, h, m); the block's output is h + m, which the next block adds inside its LN1.

Why one node, and why its own GEMMs: run as separate ops (``layer_norm`` twice, ``qkv_heads``,
``mlp``) each piece is also an autograd node with its own Python wrapper, checks and saved-tensor
bookkeeping, and with torch's GEMMs and attention each product is a dispatcher call with its
casts, views and copies around it (about 55 torch calls in the backward alone). Here the forward
is seven launches and the backward nine (a stack of blocks adds one that sums all its
LayerNorms' weight and bias gradients), with what those calls did folded into the kernels:

* ``_gemm_kernel``: C = A B with A and B at any strides (a transposed weight, dY^T for a weight
  gradient: no copies), the operands cast to the GEMM dtype in registers (autocast's weight
  casts: no cast copies, the fp32 weights saved as they are), fp32 accumulation, the product
  rounded to the GEMM dtype (the value a GEMM in that dtype returns) and stored in the dtype the
  caller wants (the residual stream's for the projection and the input gradients). Epilogues:
  the bias; fc1's GELU (storing the pre-activation too); GELU's backward on fc2's input gradient
  (storing GELU(pre) for fc2's weight gradient); a weight gradient's bias gradient, the row sums
  of dY^T summed from the tiles the product loads.
* ``_weight_grads_kernel``: two weight gradients (fc2's and fc1's, the projection's and qkv's)
  in one launch, each program a tile of one of them, as ``_gemm_kernel`` computes it.
* ``_attention_fwd_kernel``: one program per (block of queries, image and head), key blocks
  walked with an online softmax in fp32; the output written in [B, N, H, d] (rows of C: the
  projection's input, no transpose copy).
* ``_attention_bwd_kernel``: one launch whose programs compute dK, dV per key block or dQ per
  query block (delta = rowsum(dO * O) recomputed per block, no computed tile transposed),
  written straight into the gradient of qkv in qkv's layout (no packing kernel).

The backward, written out:

    dm -> d pre = (dm W2) GELU'(pre), g = GELU(pre)        (one GEMM, GELU's backward its epilogue)
       -> dy2 = d pre W1;  dW2 = dm^T g with db2 and dW1 = d pre^T y2 with db1 (one launch)
    dy2, dh -> LN2 backward (the residual's gradient added in) -> dh_total = d(x_in) + da
    da -> dO = da Wp -> attention backward -> d qkv -> dy1 = d qkv Wqkv
    dy1, dh_total (+ d(x_in) from outside) -> LN1 backward -> dx (= d pending)
    dWp = da^T o with dbp and dWqkv = d qkv^T y1 with dbqkv (one launch)

It saves x_in, y1, qkv, the attention output and its log-sum-exp, h, y2, the MLP
pre-activation, the LayerNorm statistics and the weights as given, nothing more. A weight that
does not require grad costs no product in the backward (its bias's gradient, when wanted, is the
same row sums without the product: bitwise what the trainable weight's launch gives).
Under autocast the GEMMs and attention run in the autocast dtype and the residual stream stays
in x's dtype, as the per-op path computes them; the LayerNorms normalise the stream in fp32 and
write their outputs in the autocast dtype (the values the per-op path's casts give, and what the
backward keeps, as the per-op path keeps its GEMMs' cast inputs). fp32 products are exact fp32
(``input_precision="ieee"``), as torch's are by default. The GEMM tiles are fixed per dtype
(128 x 128 x 64 for 16-bit operands, 64 x 64 where that leaves fewer than 128 programs; 64 x 64
x 16 on 8 warps in fp32), no autotuning, no split-K: a weight gradient of a narrow layer runs on
few programs. Tiles were chosen by compiling for sm_90 and sm_80 (``benchmarks/compile_report.py``:
no spills at ViT-S..H shapes), not by timing: no GPU has run these kernels yet.

Under ``torch.compile`` / a dispatch mode the launchers are called through their custom ops
(``direct_launch``): ``tec_fast::vit_block_linear``, ``..._linear_dx``, ``..._gelu_grad``,
``..._weight_grad``, ``..._weight_grads``, ``..._attention`` and ``..._attention_backward``, and
the LayerNorm's.
Reference: ``tec_fast.ops.reference.vit_block``.
"""
from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import (LaunchConfig, autocast_dtype, cdiv, direct_launch, dtype_reasons, eager_apply,
                                      first_order, launch_with, next_pow2)
from tec_fast.kernels.layer_norm import (MAX_C, _bwd_config, _layer_norm_backward_op, _layer_norm_bwd,
                                         _layer_norm_bwd_rows, _layer_norm_fwd, layer_norm_dwdb,
                                         layer_norm_forward)
from tec_fast.kernels.mlp import _gelu, _two_phi

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_LOG2E = 1.4426950408889634
_GROUP_M = 8          # row blocks per group of programs (they share B's column tiles in L2)
_FEW_TILES = 128      # fewer 128 x 128 output tiles than this: 64 x 64 tiles (more programs)


def _dot_precision(dt: torch.dtype) -> str:
    return "ieee" if dt == torch.float32 else "tf32"  # fp32 exact, as torch's GEMMs by default


# ---- GEMM ---------------------------------------------------------------------------------------

@triton.jit
def _gemm_tile(pid, a_ptr, b_ptr, c_ptr, bias_ptr, pre_ptr, g_ptr, sum_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_bias,
               EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, ROW_SUM: tl.constexpr,
               DT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Program ``pid``'s tile of C = A B with its epilogue (see the module's docstring)."""
    if DOT:  # programs in groups of GROUP_M row blocks, column block by column block
        grid_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
    else:  # row sums only: one program per row block
        pid_m = pid
        pid_n = 0
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + rk[:, None] * s_bk + rn.to(tl.int64)[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DT)
        if ROW_SUM:
            if pid_n == 0:  # only the first column block's programs store the sums: only they add them
                row_sum += tl.sum(a.to(tl.float32), axis=1)
        if DOT:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(DT)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    if ROW_SUM:  # the first column block's programs store them
        if DOT:
            tl.store(sum_ptr + rm, row_sum.to(sum_ptr.dtype.element_ty), mask=m_ok & (tl.zeros((BLOCK_M,), tl.int32) + pid_n == 0))
        else:
            tl.store(sum_ptr + rm, row_sum.to(sum_ptr.dtype.element_ty), mask=m_ok)
    if DOT:
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:  # added in fp32 to the fp32 product, the bias first rounded to DT (as a cast bias is)
            acc += tl.load(bias_ptr + rn * s_bias, mask=n_ok, other=0.0).to(DT).to(tl.float32)[None, :]
        if EPILOGUE == 4:  # plus the matrix at pre_ptr, before the one rounding (a GEMM with beta = 1)
            acc += tl.load(pre_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        val = acc.to(DT).to(tl.float32)  # what a GEMM in DT returns
        if EPILOGUE == 1:  # fc1: keep the pre-activation, return GELU of it
            tl.store(pre_ptr + offs, val.to(pre_ptr.dtype.element_ty), mask=ok)
            val = _gelu(val)
        elif EPILOGUE == 3:  # fc1 with no backward to come (the frozen base): GELU alone
            val = _gelu(val)
        elif EPILOGUE == 2:  # fc2's input gradient: times GELU'(pre); GELU(pre) recomputed for dW2
            z = tl.load(pre_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            two_phi, e = _two_phi(z)
            tl.store(g_ptr + offs, (0.5 * z * two_phi).to(g_ptr.dtype.element_ty), mask=ok)
            val = val * (0.5 * two_phi + z * 0.3989422804014327 * e)
        tl.store(c_ptr + offs, val.to(c_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, pre_ptr, g_ptr, sum_ptr, M, N, K,
                 s_am, s_ak, s_bk, s_bn, s_bias, s_za, s_zb, s_zc, s_zpre, s_zbias, s_zsum,
                 EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, ROW_SUM: tl.constexpr,
                 DT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Axis 1 of the grid walks a batch of products (the encoder adapter's groups): product z
    reads and writes each operand at its batch stride s_z* times z (0: one operand for all)."""
    z = tl.program_id(1).to(tl.int64)
    _gemm_tile(tl.program_id(0), a_ptr + z * s_za, b_ptr + z * s_zb, c_ptr + z * s_zc, bias_ptr + z * s_zbias,
               pre_ptr + z * s_zpre, g_ptr + z * s_zc, sum_ptr + z * s_zsum, M, N, K,
               s_am, s_ak, s_bk, s_bn, s_bias, EPILOGUE, HAS_BIAS, DOT, ROW_SUM, DT, DOT_PRECISION,
               BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _weight_grads_kernel(a0, b0, c0, sum0, m0, n0, s0_am, s0_ak, s0_bk, s0_bn,
                         a1, b1, c1, sum1, m1, n1, s1_am, s1_ak, s1_bk, s1_bn, end0, K,
                         SUM0: tl.constexpr, SUM1: tl.constexpr, DT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Two weight gradients C_i = A_i B_i over the same K rows (with A_i's row sums where SUM_i)
    in one launch: programs [0, end0) compute the first, the rest the second. Two, not more:
    each branch gets its own shared memory (two 16-bit 128 x 128 x 64 tiles in three stages:
    160 KB at sm_90, 128 KB at sm_80, within both limits; four would not be)."""
    pid = tl.program_id(0)
    if pid < end0:
        _gemm_tile(pid, a0, b0, c0, c0, c0, c0, sum0, m0, n0, K, s0_am, s0_ak, s0_bk, s0_bn, 0, 0, False, True,
                   SUM0, DT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _gemm_tile(pid - end0, a1, b1, c1, c1, c1, c1, sum1, m1, n1, K, s1_am, s1_ak, s1_bk, s1_bn, 0, 0, False,
                   True, SUM1, DT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@functools.lru_cache(maxsize=None)
def _gemm_config(M: int, N: int, K: int, dt: torch.dtype) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): 128 x 128 x 64 tiles for 16-bit operands (64 x
    64 where that gives fewer than ``_FEW_TILES`` programs), 64 x 64 x 16 on 8 warps for fp32
    (exact FMA products); each side no larger than the next power of two of the matrix's (at
    least 16, ``tl.dot``'s minimum)."""
    bm, bn, bk, warps, stages = _tile_sizes(dt, cdiv(M, 128) * cdiv(N, 128) < _FEW_TILES)
    return _fit(M, bm), _fit(N, bn), _fit(K, bk), warps, stages


def _tile_sizes(dt: torch.dtype, few: bool) -> Tuple[int, int, int, int, int]:
    """``_gemm_config``'s tiles before they are fitted to the matrix (``few``: fewer than
    ``_FEW_TILES`` 128 x 128 output tiles)."""
    if dt == torch.float32:
        return 64, 64, 16, 8, 2
    return (64, 64, 64, 4, 3) if few else (128, 128, 64, 8, 3)


def _fit(n: int, cap: int) -> int:
    """A tile side: ``cap``, or the next power of two of the matrix's side ``n`` (at least 16,
    ``tl.dot``'s minimum) where that is smaller."""
    return min(cap, max(16, next_pow2(n)))


@functools.lru_cache(maxsize=None)
def _gemm_launch(M: int, N: int, K: int, dt: torch.dtype, epilogue: int, has_bias: bool, dot: bool,
                 row_sum: bool) -> Tuple[Tuple[int], LaunchConfig]:
    """(grid, constexprs and options) of one ``_gemm_kernel`` call: a function of the sizes and
    flags alone, so kept."""
    bm, bn, bk, warps, stages = _gemm_config(M, N, K, dt)
    grid = (cdiv(M, bm) * cdiv(N, bn),) if dot else (cdiv(M, bm),)
    return grid, LaunchConfig(EPILOGUE=epilogue, HAS_BIAS=has_bias, DOT=dot, ROW_SUM=row_sum, DT=_TL[dt],
                              DOT_PRECISION=_dot_precision(dt), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M,
                              num_warps=warps, num_stages=stages)


_ONE = (0, 0, 0, 0, 0, 0)  # one product: no batch strides


def _gemm(a, a_strides, b, b_strides, c, M: int, N: int, K: int, dt: torch.dtype, bias=None, pre=None, g=None,
          row_sum=None, epilogue: int = 0, dot: bool = True, batch: int = 1, batch_strides: tuple = _ONE) -> None:
    """Launch ``_gemm_kernel``: c [M, N] = A [M, K] B [K, N] (strides given) with the epilogue;
    ``batch`` such products with the batch strides (A, B, C / g, pre, bias, row sums) given."""
    grid, config = _gemm_launch(M, N, K, dt, epilogue, bias is not None, dot, row_sum is not None)
    launch_with(_gemm_kernel, grid if batch == 1 else (grid[0], batch), config, a, b, c, c if bias is None else bias,
                c if pre is None else pre, c if g is None else g, c if row_sum is None else row_sum, M, N, K,
                a_strides[0], a_strides[1], b_strides[0], b_strides[1], 0 if bias is None else bias.stride(-1),
                *batch_strides)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], dt: torch.dtype,
            out_dtype: torch.dtype, gelu: bool = False, keep_pre: bool = True, out: Optional[torch.Tensor] = None,
            pre: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x [M, K], w [N, K] (any strides, any float dtypes: cast to ``dt`` in registers) ->
    (x w^T + bias [M, N] in ``out_dtype`` with the values of a GEMM in ``dt``, None); with
    ``gelu``: (GELU of it in ``dt``, the pre-activation in ``dt``, or None without ``keep_pre``:
    then it is neither allocated nor written). ``out``, ``pre``: where to write them
    (contiguous [M, N] of those dtypes), else new tensors."""
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    if not (gelu and keep_pre):
        pre = None
    elif pre is None:
        pre = torch.empty(M, N, dtype=dt, device=x.device)
    if M and N:
        sw = w.stride()  # one call for both (each stride(i) is a call of its own)
        _gemm(x, x.stride(), w, (sw[1], sw[0]), out, M, N, K, dt, bias=bias, pre=pre,
              epilogue=(1 if keep_pre else 3) if gelu else 0)
    return out, pre


def _linear_dx(dy: torch.Tensor, w: torch.Tensor, dt: torch.dtype, out_dtype: torch.dtype,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dy [M, N], w [N, K] -> dy w [M, K] in ``out_dtype`` (a linear layer's input gradient),
    written into ``out`` where given."""
    M, N = dy.shape
    K = w.shape[1]
    if out is None:
        out = torch.empty(M, K, dtype=out_dtype, device=dy.device)
    if M and K:
        _gemm(dy, dy.stride(), w, w.stride(), out, M, K, N, dt)
    return out


def _gelu_grad(dm: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, dt: torch.dtype,
               dpre: Optional[torch.Tensor] = None, g: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """dm [M, C], fc2's weight w2 [C, hidden], pre [M, hidden] -> (d pre = (dm w2) GELU'(pre),
    GELU(pre)), both [M, hidden] in ``dt`` (written into ``dpre``, ``g`` where given)."""
    M = dm.shape[0]
    hidden = w2.shape[1]
    if dpre is None:
        dpre = torch.empty(M, hidden, dtype=dt, device=dm.device)
    if g is None:
        g = torch.empty(M, hidden, dtype=dt, device=dm.device)
    if M and hidden:
        _gemm(dm, dm.stride(), w2, w2.stride(), dpre, M, hidden, dm.shape[1], dt, pre=pre, g=g, epilogue=2)
    return dpre, g


def _weight_grad(dy: torch.Tensor, x: torch.Tensor, dt: torch.dtype, w_dtype: Optional[torch.dtype],
                 b_dtype: Optional[torch.dtype]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dy [M, N], x [M, K] -> (dy^T x [N, K] in ``w_dtype``, the column sums of dy [N] in
    ``b_dtype``), each None where its dtype is None. The sums come from the same loads as the
    product (the operands as cast to ``dt``); without the product they are the same sums, so a
    frozen weight changes its bias's gradient by nothing."""
    M, N = dy.shape
    K = x.shape[1]
    dw = None if w_dtype is None else torch.empty(N, K, dtype=w_dtype, device=dy.device)
    db = None if b_dtype is None else torch.empty(N, dtype=b_dtype, device=dy.device)
    if N and (dw is not None and K or db is not None):
        sdy = dy.stride()
        _gemm(dy, (sdy[1], sdy[0]), x, x.stride(), db if dw is None else dw, N, K, M, dt,
              row_sum=db, dot=dw is not None and K > 0)
    return dw, db


@functools.lru_cache(maxsize=None)
def _weight_grads_launch(N0: int, K0: int, N1: int, K1: int, rows: int, dt: torch.dtype, sum0: bool,
                         sum1: bool) -> Tuple[Tuple[int], int, LaunchConfig]:
    """(grid, the first product's programs, constexprs and options) of one
    ``_weight_grads_kernel`` call for dW_0 [N0, K0] and dW_1 [N1, K1] over ``rows`` rows, row sums
    where ``sum0`` / ``sum1``: one tile size for both, chosen as ``_gemm_config`` chooses it for
    their total number of tiles."""
    few = cdiv(N0, 128) * cdiv(K0, 128) + cdiv(N1, 128) * cdiv(K1, 128) < _FEW_TILES
    bm, bn, bk, warps, stages = _tile_sizes(dt, few)
    bm, bn, bk = _fit(max(N0, N1), bm), _fit(max(K0, K1), bn), _fit(rows, bk)
    end0 = cdiv(N0, bm) * cdiv(K0, bn)
    config = LaunchConfig(SUM0=sum0, SUM1=sum1, DT=_TL[dt], DOT_PRECISION=_dot_precision(dt), BLOCK_M=bm,
                          BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M, num_warps=warps, num_stages=stages)
    return (end0 + cdiv(N1, bm) * cdiv(K1, bn),), end0, config


def _weight_grads(p0: tuple, p1: tuple, dt: torch.dtype, single: Callable = None, pair: Callable = None,
                  out: Optional[tuple] = None):
    """Two weight gradients over the same rows (fc2's and fc1's, the projection's and qkv's):
    ``p0``, ``p1`` = (dy [M, N_i], x [M, K_i], w_dtype, b_dtype) -> ((dW_0, db_0), (dW_1, db_1)),
    each as ``_weight_grad`` gives it. Both products in one launch (``pair``, default
    ``_weight_grads_pair``, writing into ``out`` where given) where both are wanted, non-empty
    and of one weight dtype (and one bias dtype); else each through ``single`` (default
    ``_weight_grad``; a frozen weight's bias sums)."""
    dy0, x0, w0, b0 = p0
    dy1, x1, w1, b1 = p1
    if w0 is not None and w0 == w1 and (b0 is None or b1 is None or b0 == b1) \
            and dy0.shape[1] and x0.shape[1] and dy1.shape[1] and x1.shape[1]:
        b_dtype = b0 if b0 is not None else (b1 if b1 is not None else w0)
        return (pair or _weight_grads_pair)(dy0, x0, dy1, x1, dt, w0, b_dtype, b0 is not None, b1 is not None, out)
    single = single or _weight_grad
    return single(dy0, x0, dt, w0, b0), single(dy1, x1, dt, w1, b1)


def _weight_grads_pair(dy0: torch.Tensor, x0: torch.Tensor, dy1: torch.Tensor, x1: torch.Tensor, dt: torch.dtype,
                       w_dtype: torch.dtype, b_dtype: torch.dtype, bias0: bool, bias1: bool,
                       out: Optional[tuple] = None):
    """The launch of ``_weight_grads``: ((dW_0, db_0 or None), (dW_1, db_1 or None)), written
    into ``out`` = (dW_0, db_0, dW_1, db_1) where given (a None entry: a new tensor)."""
    rows, N0, K0, N1, K1 = dy0.shape[0], dy0.shape[1], x0.shape[1], dy1.shape[1], x1.shape[1]
    dev = dy0.device
    dw0, db0, dw1, db1 = out or (None, None, None, None)
    if dw0 is None:
        dw0 = torch.empty(N0, K0, dtype=w_dtype, device=dev)
    if dw1 is None:
        dw1 = torch.empty(N1, K1, dtype=w_dtype, device=dev)
    if not bias0:
        db0 = None
    elif db0 is None:
        db0 = torch.empty(N0, dtype=b_dtype, device=dev)
    if not bias1:
        db1 = None
    elif db1 is None:
        db1 = torch.empty(N1, dtype=b_dtype, device=dev)
    grid, end0, config = _weight_grads_launch(N0, K0, N1, K1, rows, dt, bias0, bias1)
    sdy0, sx0, sdy1, sx1 = dy0.stride(), x0.stride(), dy1.stride(), x1.stride()
    launch_with(_weight_grads_kernel, grid, config,
                dy0, x0, dw0, dw0 if db0 is None else db0, N0, K0, sdy0[1], sdy0[0], sx0[0], sx0[1],
                dy1, x1, dw1, dw1 if db1 is None else db1, N1, K1, sdy1[1], sdy1[0], sx1[0], sx1[1], end0, rows)
    return (dw0, db0), (dw1, db1)


# ---- attention ----------------------------------------------------------------------------------
# q, k, v are read where the qkv GEMM wrote them: qkv [B, N, 3, H, d] (rows of 3C); the output and
# its gradient are [B, N, H, d] (rows of C, what the projection reads); the gradient of qkv is
# written in qkv's layout. The row log-sum-exp is kept in base 2 of the scaled logits.

@triton.jit
def _head_rows(pid, N, H, d, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """An attention program's place: (image x head index from the grid's second axis, the image
    (int64), the head's first column in q, its block of BLOCK token rows, rows < N, the head's
    BLOCK_D columns, columns < d)."""
    bh = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    dd = tl.arange(0, BLOCK_D)
    return bh, (bh // H).to(tl.int64), (bh % H) * d, rows, rows < N, dd, dd < d


@triton.jit
def _attention_fwd_kernel(qkv_ptr, o_ptr, lse_ptr, N, H, d, C, qk_scale,
                          HAS_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, col, rq, q_ok, dd, d_ok = _head_rows(tl.program_id(0), N, H, d, BLOCK_M, BLOCK_D)
    base = qkv_ptr + b * N * 3 * C + col
    q = tl.load(base + rq[:, None] * (3 * C) + dd[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rk = n0 + tl.arange(0, BLOCK_N)
        k_ok = rk < N
        kt = tl.load(base + C + rk[None, :] * (3 * C) + dd[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(base + 2 * C + rk[:, None] * (3 * C) + dd[None, :], mask=k_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_rows = o_ptr + (b * N + rq)[:, None] * C + col + dd[None, :]
    tl.store(o_rows, acc.to(o_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    if HAS_LSE:
        tl.store(lse_ptr + bh.to(tl.int64) * N + rq, m_i + tl.log2(l_i), mask=q_ok)


@triton.jit
def _attention_bwd_kernel(qkv_ptr, o_ptr, do_ptr, lse_ptr, dqkv_ptr, N, H, d, C, qk_scale, sm_scale, kv_blocks,
                          DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """One launch for both halves of the backward: programs (block, image x head) below
    ``kv_blocks`` compute a key block's dK and dV, the others a query block's dQ."""
    pid = tl.program_id(0)
    if pid < kv_blocks:
        _attention_bwd_kv(qkv_ptr, o_ptr, do_ptr, lse_ptr, dqkv_ptr, pid, N, H, d, C, qk_scale, sm_scale,
                          DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        _attention_bwd_q(qkv_ptr, o_ptr, do_ptr, lse_ptr, dqkv_ptr, pid - kv_blocks, N, H, d, C, qk_scale,
                         sm_scale, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _attention_bwd_kv(qkv_ptr, o_ptr, do_ptr, lse_ptr, dqkv_ptr, pid_n, N, H, d, C, qk_scale, sm_scale,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """dK, dV of one block of keys, over the query blocks in transposed form (keys as rows, so no
    computed tile is transposed): P^T = exp2(K Q^T scale - lse), dV = P^T dO,
    dS^T = P^T * (V dO^T - delta), dK = dS^T Q * scale."""
    bh, b, col, rk, k_ok, dd, d_ok = _head_rows(pid_n, N, H, d, BLOCK_N, BLOCK_D)
    kv_ok = k_ok[:, None] & d_ok[None, :]
    base = b * N * 3 * C + col  # this image's and head's q columns in qkv
    kv_rows = base + rk[:, None] * (3 * C) + dd[None, :]
    k = tl.load(qkv_ptr + kv_rows + C, mask=kv_ok, other=0.0)
    v = tl.load(qkv_ptr + kv_rows + 2 * C, mask=kv_ok, other=0.0)
    o_base = b * N * C + col
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(0, N, BLOCK_M):
        rq = m0 + tl.arange(0, BLOCK_M)
        q_ok = rq < N
        ok = q_ok[:, None] & d_ok[None, :]
        ok_t = d_ok[:, None] & q_ok[None, :]
        q = tl.load(qkv_ptr + base + rq[:, None] * (3 * C) + dd[None, :], mask=ok, other=0.0)
        qt = tl.load(qkv_ptr + base + rq[None, :] * (3 * C) + dd[:, None], mask=ok_t, other=0.0)
        do = tl.load(do_ptr + o_base + rq[:, None] * C + dd[None, :], mask=ok, other=0.0)
        dot_ = tl.load(do_ptr + o_base + rq[None, :] * C + dd[:, None], mask=ok_t, other=0.0)
        o_t = tl.load(o_ptr + o_base + rq[None, :] * C + dd[:, None], mask=ok_t, other=0.0)
        delta = tl.sum(dot_.to(tl.float32) * o_t.to(tl.float32), axis=0)  # rowsum(dO * O) [BLOCK_M]
        lse = tl.load(lse_ptr + bh.to(tl.int64) * N + rq, mask=q_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.where(k_ok[:, None] & q_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, dot_, input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    tl.store(dqkv_ptr + kv_rows + C, (dk * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dqkv_ptr + kv_rows + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attention_bwd_q(qkv_ptr, o_ptr, do_ptr, lse_ptr, dqkv_ptr, pid_m, N, H, d, C, qk_scale, sm_scale,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """dQ of one block of queries: dS = P * (dO V^T - delta), dQ = dS K * scale."""
    bh, b, col, rq, q_ok, dd, d_ok = _head_rows(pid_m, N, H, d, BLOCK_M, BLOCK_D)
    ok = q_ok[:, None] & d_ok[None, :]
    base = b * N * 3 * C + col
    q = tl.load(qkv_ptr + base + rq[:, None] * (3 * C) + dd[None, :], mask=ok, other=0.0)
    o_rows = b * N * C + col + rq[:, None] * C + dd[None, :]
    do = tl.load(do_ptr + o_rows, mask=ok, other=0.0)
    o = tl.load(o_ptr + o_rows, mask=ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * N + rq, mask=q_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rk = n0 + tl.arange(0, BLOCK_N)
        k_ok = rk < N
        ok_t = d_ok[:, None] & k_ok[None, :]
        kt = tl.load(qkv_ptr + base + C + rk[None, :] * (3 * C) + dd[:, None], mask=ok_t, other=0.0)
        vt = tl.load(qkv_ptr + base + 2 * C + rk[None, :] * (3 * C) + dd[:, None], mask=ok_t, other=0.0)
        k = tl.load(qkv_ptr + base + C + rk[:, None] * (3 * C) + dd[None, :], mask=k_ok[:, None] & d_ok[None, :],
                    other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(dqkv_ptr + base + rq[:, None] * (3 * C) + dd[None, :], (dq * sm_scale).to(dqkv_ptr.dtype.element_ty),
             mask=ok)


# (forward, backward) tiles: (queries, keys, warps), by the product's dtype and the padded head
# width; chosen with ``benchmarks/compile_report.py`` (sm_90 and sm_80: no spills at ViT-S..H)
_ATTENTION_TILES = {
    (False, 64): ((64, 64, 4), (64, 32, 8)),    # 16-bit, on tensor cores
    (False, 128): ((64, 64, 8), (64, 32, 8)),
    (False, 256): ((32, 32, 8), (32, 32, 8)),
    (True, 64): ((32, 32, 8), (32, 16, 4)),     # fp32: exact FMA products, more held per thread
    # (the forward with 4 warps: 255 registers and a spill under Triton 3.6, 80 and none under 3.9)
    (True, 128): ((16, 16, 4), (16, 16, 4)),
    (True, 256): ((16, 16, 4), (16, 16, 4)),
}


@functools.lru_cache(maxsize=None)
def _attention_config(N: int, d: int, dt: torch.dtype, backward: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_M queries, BLOCK_N keys, BLOCK_D, warps): d padded to a power of two (at least 16),
    tiles from ``_ATTENTION_TILES`` (heads past 256 values: its 256 row), no side larger than N's
    next power of two (at least 16, ``tl.dot``'s minimum)."""
    block_d = max(16, next_pow2(d))
    bm, bn, warps = _ATTENTION_TILES[dt == torch.float32, max(64, min(block_d, 256))][backward]
    fit = lambda cap: min(cap, max(16, next_pow2(N)))  # noqa: E731
    return fit(bm), fit(bn), block_d, warps


@functools.lru_cache(maxsize=None)
def _attention_launch(N: int, d: int, dt: torch.dtype, backward: bool, save: bool
                      ) -> Tuple[int, int, LaunchConfig]:
    """(query blocks, key blocks, constexprs and options) of the forward (``save``: keep the
    log-sum-exp) or the backward attention launch."""
    bm, bn, bd, warps = _attention_config(N, d, dt, backward)
    meta = dict(DOT_PRECISION=_dot_precision(dt), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=2)
    if not backward:
        meta = dict(HAS_LSE=save, **meta)
    return cdiv(N, bm), cdiv(N, bn), LaunchConfig(**meta)


def _attention(qkv: torch.Tensor, B: int, N: int, H: int, save: bool, o: Optional[torch.Tensor] = None,
               lse: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """qkv [B N, 3C] (contiguous, [B, N, 3, H, d]) -> (softmax(q k^T / sqrt(d)) v per head as
    [B N, C] ([B, N, H, d]), the rows' log-sum-exp [B, H, N] fp32 (base 2, scaled logits) or None
    without ``save``), written into ``o``, ``lse`` where given."""
    C = qkv.shape[1] // 3
    d = C // H
    if o is None:
        o = torch.empty(B * N, C, dtype=qkv.dtype, device=qkv.device)
    if not save:
        lse = None
    elif lse is None:
        lse = torch.empty(B, H, N, dtype=torch.float32, device=qkv.device)
    if B and N:
        q_blocks, _, config = _attention_launch(N, d, qkv.dtype, False, save)
        if B * H <= _MAX_GRID_Y:
            launch_with(_attention_fwd_kernel, (q_blocks, B * H), config, qkv, o, o if lse is None else lse,
                        N, H, d, C, d ** -0.5 * _LOG2E)
            return o, lse
        for b0, n in _image_chunks(B, H):
            rows = slice(b0 * N, (b0 + n) * N)
            launch_with(_attention_fwd_kernel, (q_blocks, n * H), config, qkv[rows], o[rows],
                        o if lse is None else lse[b0:b0 + n], N, H, d, C, d ** -0.5 * _LOG2E)
    return o, lse


_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, where the attention puts images x heads


def _image_chunks(B: int, H: int) -> List[Tuple[int, int]]:
    """(first image, images) of the attention launches for B images of H heads where B x H passes
    the grid's second-axis limit (batches of thousands of images, in inference)."""
    per = max(1, _MAX_GRID_Y // H)
    return [(b0, min(per, B - b0)) for b0 in range(0, B, per)]


def _attention_grad(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                    dqkv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d(out) [B N, C] (contiguous), qkv, out, lse as ``_attention`` made them -> d(qkv) [B N, 3C]
    (written into ``dqkv`` where given)."""
    B, H, N = lse.shape
    C = o.shape[1]
    d = C // H
    if dqkv is None:
        dqkv = torch.empty_like(qkv)
    if B and N:
        q_blocks, kv_blocks, config = _attention_launch(N, d, qkv.dtype, True, True)
        if B * H <= _MAX_GRID_Y:
            launch_with(_attention_bwd_kernel, (kv_blocks + q_blocks, B * H), config, qkv, o, do, lse, dqkv,
                        N, H, d, C, d ** -0.5 * _LOG2E, d ** -0.5, kv_blocks)
            return dqkv
        for b0, n in _image_chunks(B, H):
            rows = slice(b0 * N, (b0 + n) * N)
            launch_with(_attention_bwd_kernel, (kv_blocks + q_blocks, n * H), config, qkv[rows], o[rows], do[rows],
                        lse[b0:b0 + n], dqkv[rows], N, H, d, C, d ** -0.5 * _LOG2E, d ** -0.5, kv_blocks)
    return dqkv


# ---- the custom ops: what torch.compile and dispatch modes see ---------------------------------

@torch.library.custom_op("tec_fast::vit_block_linear", mutates_args=())
def _linear_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], dt: torch.dtype,
               out_dtype: torch.dtype, gelu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    out, pre = _linear(x, w, bias, dt, out_dtype, gelu)
    return out, (x.new_empty(0, dtype=dt) if pre is None else pre)


@_linear_op.register_fake
def _(x, w, bias, dt, out_dtype, gelu):
    M, N = x.shape[0], w.shape[0]
    return x.new_empty(M, N, dtype=out_dtype), x.new_empty((M, N) if gelu else (0,), dtype=dt)


@torch.library.custom_op("tec_fast::vit_block_linear_dx", mutates_args=())
def _linear_dx_op(dy: torch.Tensor, w: torch.Tensor, dt: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    return _linear_dx(dy, w, dt, out_dtype)


@_linear_dx_op.register_fake
def _(dy, w, dt, out_dtype):
    return dy.new_empty(dy.shape[0], w.shape[1], dtype=out_dtype)


@torch.library.custom_op("tec_fast::vit_block_gelu_grad", mutates_args=())
def _gelu_grad_op(dm: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor,
                  dt: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    return _gelu_grad(dm, w2, pre, dt)


@_gelu_grad_op.register_fake
def _(dm, w2, pre, dt):
    shape = (dm.shape[0], w2.shape[1])
    return dm.new_empty(shape, dtype=dt), dm.new_empty(shape, dtype=dt)


@torch.library.custom_op("tec_fast::vit_block_weight_grad", mutates_args=())
def _weight_grad_op(dy: torch.Tensor, x: torch.Tensor, dt: torch.dtype, w_dtype: Optional[torch.dtype],
                    b_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor]:
    dw, db = _weight_grad(dy, x, dt, w_dtype, b_dtype)
    return (dy.new_empty(0) if dw is None else dw), (dy.new_empty(0) if db is None else db)


@_weight_grad_op.register_fake
def _(dy, x, dt, w_dtype, b_dtype):
    N, K = dy.shape[1], x.shape[1]
    return (dy.new_empty(0) if w_dtype is None else dy.new_empty(N, K, dtype=w_dtype),
            dy.new_empty(0) if b_dtype is None else dy.new_empty(N, dtype=b_dtype))


@torch.library.custom_op("tec_fast::vit_block_weight_grads", mutates_args=())
def _weight_grads_pair_op(dy0: torch.Tensor, x0: torch.Tensor, dy1: torch.Tensor, x1: torch.Tensor, dt: torch.dtype,
                          w_dtype: torch.dtype, b_dtype: torch.dtype, bias0: bool, bias1: bool
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    (dw0, db0), (dw1, db1) = _weight_grads_pair(dy0, x0, dy1, x1, dt, w_dtype, b_dtype, bias0, bias1)
    return dw0, (dw0.new_empty(0) if db0 is None else db0), dw1, (dw1.new_empty(0) if db1 is None else db1)


@_weight_grads_pair_op.register_fake
def _(dy0, x0, dy1, x1, dt, w_dtype, b_dtype, bias0, bias1):
    return (dy0.new_empty((dy0.shape[1], x0.shape[1]), dtype=w_dtype),
            dy0.new_empty((dy0.shape[1] if bias0 else 0,), dtype=b_dtype),
            dy1.new_empty((dy1.shape[1], x1.shape[1]), dtype=w_dtype),
            dy1.new_empty((dy1.shape[1] if bias1 else 0,), dtype=b_dtype))


@torch.library.custom_op("tec_fast::vit_block_attention", mutates_args=())
def _attention_op(qkv: torch.Tensor, B: int, N: int, H: int, save: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    o, lse = _attention(qkv, B, N, H, save)
    return o, (qkv.new_empty(0, dtype=torch.float32) if lse is None else lse)


@_attention_op.register_fake
def _(qkv, B, N, H, save):
    C = qkv.shape[1] // 3
    return (qkv.new_empty(B * N, C),
            qkv.new_empty((B, H, N) if save else (0,), dtype=torch.float32))


@torch.library.custom_op("tec_fast::vit_block_attention_backward", mutates_args=())
def _attention_grad_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return _attention_grad(do, qkv, o, lse)


@_attention_grad_op.register_fake
def _(do, qkv, o, lse):
    return qkv.new_empty(qkv.shape)


class _Route(NamedTuple):
    """The launchers a block calls, straight (plain eager) or through their custom ops. Where a
    launcher takes destinations (``out=`` and the like), the custom-op route ignores them and
    returns new tensors: callers always use what is returned."""
    linear: Callable
    linear_dx: Callable
    gelu_grad: Callable
    weight_grad: Callable
    weight_grads: Callable
    attention: Callable
    attention_grad: Callable
    ln_fwd: Callable
    ln_bwd: Callable


def _linear_traced(x, w, bias, dt, out_dtype, gelu=False, keep_pre=True, out=None, pre=None):
    out, pre = _linear_op(x, w, bias, dt, out_dtype, gelu)
    return out, (pre if gelu and keep_pre else None)


def _linear_dx_traced(dy, w, dt, out_dtype, out=None):
    return _linear_dx_op(dy, w, dt, out_dtype)


def _gelu_grad_traced(dm, w2, pre, dt, dpre=None, g=None):
    return _gelu_grad_op(dm, w2, pre, dt)


def _weight_grad_traced(dy, x, dt, w_dtype, b_dtype):
    dw, db = _weight_grad_op(dy, x, dt, w_dtype, b_dtype)
    return (None if w_dtype is None else dw), (None if b_dtype is None else db)


def _attention_traced(qkv, B, N, H, save, o=None, lse=None):
    o, lse = _attention_op(qkv, B, N, H, save)
    return o, (lse if save else None)


def _attention_grad_traced(do, qkv, o, lse, dqkv=None):
    return _attention_grad_op(do, qkv, o, lse)


def _weight_grads_pair_traced(dy0, x0, dy1, x1, dt, w_dtype, b_dtype, bias0, bias1, out=None):
    dw0, db0, dw1, db1 = _weight_grads_pair_op(dy0, x0, dy1, x1, dt, w_dtype, b_dtype, bias0, bias1)
    return (dw0, db0 if bias0 else None), (dw1, db1 if bias1 else None)


def _weight_grads_traced(p0, p1, dt, out=None):
    return _weight_grads(p0, p1, dt, _weight_grad_traced, _weight_grads_pair_traced)


_DIRECT = _Route(_linear, _linear_dx, _gelu_grad, _weight_grad, _weight_grads, _attention, _attention_grad,
                 _layer_norm_fwd, _layer_norm_bwd)
_TRACED = _Route(_linear_traced, _linear_dx_traced, _gelu_grad_traced, _weight_grad_traced, _weight_grads_traced,
                 _attention_traced, _attention_grad_traced, layer_norm_forward, _layer_norm_backward_op)


def _route() -> _Route:
    return _DIRECT if direct_launch() else _TRACED


def _cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dt else t.to(dt)


# ---- a stack's buffers ----------------------------------------------------------------------------
# Every tensor a block writes is an allocation, a dispatcher call on the host (about 1 us here;
# more through CUDA's caching allocator): 12 per block forward, 16 per backward. A stack of
# blocks (direct route) allocates each kind once: what the backward keeps as one [n, ...] tensor
# whose slices the blocks write, and what only the next launches read (the projection's output
# before its LayerNorm, GELU's output, m; the backward's intermediates) as one tensor every
# block reuses. Each block has read a reused tensor before the next block's launch overwrites it
# (launches run in order on one stream); what leaves the stack (its outputs, the gradients) is
# never overwritten later.

class _Acts(NamedTuple):
    """Where one block's forward writes (None: a new tensor)."""
    y1: Optional[torch.Tensor]     # [rows, C] dt
    x_in: Optional[torch.Tensor]   # [B, N, C] sd: LN1's residual output
    s1: Optional[torch.Tensor]     # [2, rows] fp32
    qkv: Optional[torch.Tensor]    # [rows, 3C] dt
    o: Optional[torch.Tensor]      # [rows, C] dt
    lse: Optional[torch.Tensor]    # [B, H, N] fp32
    p: Optional[torch.Tensor]      # [rows, C] sd
    y2: Optional[torch.Tensor]     # [rows, C] dt
    h: Optional[torch.Tensor]      # [B, N, C] sd
    s2: Optional[torch.Tensor]     # [2, rows] fp32
    g: Optional[torch.Tensor]      # [rows, hidden] dt
    pre: Optional[torch.Tensor]    # [rows, hidden] dt
    m: Optional[torch.Tensor]      # [rows, C] dt


_NEW_ACTS = _Acts(*(None,) * 13)


def _stack_acts(x: torch.Tensor, first_res: bool, n: int, H: int, hidden: int, dt: torch.dtype, save: bool,
                taps: Tuple[int, ...], qk_block: int) -> List[_Acts]:
    """The forward's destinations for n >= 2 blocks on x [B, N, C] (``first_res``: block 0 adds a
    pending branch, so writes an x_in). With ``save`` what the backward keeps is one [n, ...]
    tensor per kind; without, every kind is one reused tensor, except the x_in of the blocks in
    ``taps`` and block ``qk_block``'s qkv, which leave the stack (new tensors)."""
    B, N, C = x.shape
    rows, sd, dev = B * N, x.dtype, x.device

    def shared(*shape, dtype=dt, skip=()):
        t = torch.empty(shape, dtype=dtype, device=dev)
        return [None if i in skip else t for i in range(n)]

    def each(*shape, dtype=dt, first=True):
        if not first:  # block 0 writes none (x_in without a pending branch)
            return [None, *torch.empty((n - 1, *shape), dtype=dtype, device=dev).unbind(0)]
        return torch.empty((n, *shape), dtype=dtype, device=dev).unbind(0)

    f32 = torch.float32
    p, g, m = shared(rows, C, dtype=sd), shared(rows, hidden), shared(rows, C)
    if save:
        y1, qkv, o, y2 = each(rows, C), each(rows, 3 * C), each(rows, C), each(rows, C)
        x_in, h = each(B, N, C, dtype=sd, first=first_res), each(B, N, C, dtype=sd)
        s1, s2, lse, pre = each(2, rows, dtype=f32), each(2, rows, dtype=f32), each(B, H, N, dtype=f32), \
            each(rows, hidden)
    else:
        y1, qkv, o, y2 = shared(rows, C), shared(rows, 3 * C, skip=(qk_block,)), shared(rows, C), shared(rows, C)
        x_in, h = shared(B, N, C, dtype=sd, skip=taps), shared(B, N, C, dtype=sd)
        s1 = s2 = lse = pre = [None] * n
    return [_Acts(*a) for a in zip(y1, x_in, s1, qkv, o, lse, p, y2, h, s2, g, pre, m)]


def _one_width(params: tuple, n: int) -> bool:
    """Whether the n blocks of ``params`` can share a stack's buffers: more than one block, all
    of one MLP width (``vit_blocks`` takes blocks of different widths; those allocate per block)."""
    if n < 2:
        return False
    hidden = params[8].shape[0]
    return all(params[12 * i + 8].shape[0] == hidden for i in range(1, n))


class _Grads(NamedTuple):
    """Where one block's backward writes (None: a new tensor)."""
    dpre: Optional[torch.Tensor]   # [rows, hidden] dt
    g: Optional[torch.Tensor]      # [rows, hidden] dt
    dy2: Optional[torch.Tensor]    # [rows, C] sd
    dh: Optional[torch.Tensor]     # [B, N, C] sd: LN2's input gradient
    dout: Optional[torch.Tensor]   # [rows, C] dt
    dqkv: Optional[torch.Tensor]   # [rows, 3C] dt
    dy1: Optional[torch.Tensor]    # [rows, C] sd
    dx: Optional[torch.Tensor]     # [B, N, C] sd: LN1's input gradient
    mlp: Optional[tuple]           # fc2's and fc1's weight and bias gradients
    attn: Optional[tuple]          # the projection's and qkv's


_NEW_GRADS = _Grads(*(None,) * 10)


def _stack_grads(saved: tuple, aux: list, need: tuple, n: int, dt: torch.dtype) -> List[_Grads]:
    """The backward's destinations for n blocks: the intermediates one tensor per kind that
    every block reuses (block i's dx, which block i - 1 reads as its dh and dm, is overwritten
    only by block i - 1's last LayerNorm); a weight or bias gradient one [n, ...] tensor per
    kind where every block wants it in one dtype (else each block's is new)."""
    x_in, w1 = saved[0], saved[9]
    B, N, C = x_in.shape
    rows, hidden, sd, dev = B * N, w1.shape[0], x_in.dtype, x_in.device

    def shared(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device=dev)

    def each(j: int, shape: tuple, dtypes: list) -> list:  # parameter j's gradients
        if not all(need[12 * i + j] for i in range(n)) or any(d != dtypes[0] for d in dtypes):
            return [None] * n
        return torch.empty((n, *shape), dtype=dtypes[0], device=dev).unbind(0)

    w_dt = [[saved[13 * i + k].dtype for i in range(n)] for k in (7, 8, 9, 10)]  # wqkv, wp, w1, w2
    b_dt = [[a[3][k] for a in aux] for k in (1, 2, 4, 5)]                           # bqkv, bp, b1, b2
    dwqkv, dwp = each(2, (3 * C, C), w_dt[0]), each(4, (C, C), w_dt[1])
    dw1, dw2 = each(8, (hidden, C), w_dt[2]), each(10, (C, hidden), w_dt[3])
    dbqkv, dbp, db1, db2 = each(3, (3 * C,), b_dt[0]), each(5, (C,), b_dt[1]), each(9, (hidden,), b_dt[2]), \
        each(11, (C,), b_dt[3])
    temps = (shared(rows, hidden, dtype=dt), shared(rows, hidden, dtype=dt), shared(rows, C, dtype=sd),
             shared(B, N, C, dtype=sd), shared(rows, C, dtype=dt), shared(rows, 3 * C, dtype=dt),
             shared(rows, C, dtype=sd), shared(B, N, C, dtype=sd))
    return [_Grads(*temps, (dw2[i], db2[i], dw1[i], db1[i]), (dwp[i], dbp[i], dwqkv[i], dbqkv[i]))
            for i in range(n)]


# ---- the blocks ---------------------------------------------------------------------------------

def _forward(r: _Route, x, pending, params, H: int, eps: float, dt: torch.dtype, save: bool,
             d: _Acts = _NEW_ACTS):
    """One block on x [B, N, C] through the launchers of route ``r`` (``dt``: the GEMMs' and the
    attention's dtype; autocast may be on, nothing here is an op it casts), writing into ``d``.
    Returns (x_in, h, m, qkv, saved): qkv [B N, 3C] as the attention read it; ``saved``, what the
    backward needs besides x_in, qkv and h, None unless ``save``."""
    n1w, n1b, wqkv, bqkv, wp, bp, n2w, n2b, w1, b1, w2, b2 = params
    B, N, C = x.shape
    sd = x.dtype  # the residual stream's dtype
    rows = B * N
    if pending is None:  # y1, y2 written in dt (autocast: what the GEMMs read and the backward keeps)
        y1, _, s1 = r.ln_fwd(x, None, n1w, n1b, eps, save, dt, y=d.y1, stats=d.s1)
        x_in = x
    else:
        y1, x_in, s1 = r.ln_fwd(_cast(pending, sd), x, n1w, n1b, eps, save, dt, y=d.y1, h=d.x_in, stats=d.s1)
    y1 = y1.view(rows, C)
    qkv, _ = r.linear(y1, wqkv, bqkv, dt, dt, out=d.qkv)
    o, lse = r.attention(qkv, B, N, H, save, d.o, d.lse)
    p, _ = r.linear(o, wp, bp, dt, sd, out=d.p)  # in the stream's dtype, with the values of a GEMM in dt
    y2, h, s2 = r.ln_fwd(p.view(B, N, C), x_in, n2w, n2b, eps, save, dt, y=d.y2, h=d.h, stats=d.s2)
    y2 = y2.view(rows, C)
    g, pre = r.linear(y2, w1, b1, dt, dt, True, save, out=d.g, pre=d.pre)  # pre only for a backward
    m, _ = r.linear(g, w2, b2, dt, dt, out=d.m)
    saved = (y1, o, lse, y2, pre, s1, s2) if save else None
    return x_in, h, m.view(B, N, C), qkv, saved


def _backward(r: _Route, saved: tuple, aux: tuple, dt: torch.dtype, need: tuple, d_xin, dh, dm, d_qkv,
              parts: Optional[torch.Tensor] = None, d: _Grads = _NEW_GRADS):
    """One block's backward. ``saved``: the 13 tensors the forward kept (x_in, y1, qkv, o, h, y2,
    pre and the weights the products read), ``aux``: its LayerNorm statistics, the attention's
    log-sum-exp and its biases' dtypes; ``need``: which of its 12 parameters want a gradient (a
    frozen weight's GEMM is skipped, its bias still summed). Gradients in: of x_in (from
    outside), h and m (None: unused), and of qkv (where the caller read q and k; else None).
    With ``parts`` (two [2, programs, C] tensors) the LayerNorms (LN2, then LN1) only write their
    weight and bias partial sums there, for the caller to sum (their gradients come back None).
    Writes into ``d``. Returns (the gradient of x_in, the 12 parameters' gradients)."""
    x_in, y1, qkv, o, h, y2, pre, wqkv, wp, w1, w2, n1w, n2w = saved
    s1, s2, lse, (n1b_dt, bqkv_dt, bp_dt, n2b_dt, b1_dt, b2_dt) = aux
    if not x_in.is_contiguous():  # x as given (no pending): the LayerNorm backward reads rows
        x_in = x_in.contiguous()
    B, N, C = x_in.shape
    rows, sd = B * N, x_in.dtype
    # MLP branch
    if dm is not None:
        dm = dm.reshape(rows, C)
        dpre, g = r.gelu_grad(dm, w2, pre, dt, d.dpre, d.g)
        dy2 = r.linear_dx(dpre, w1, dt, sd, d.dy2).view(B, N, C)
        (dw2, db2), (dw1, db1) = r.weight_grads(  # fc2's and fc1's in one launch
            (dm, g, w2.dtype if need[10] else None, b2_dt if need[11] else None),
            (dpre, y2, w1.dtype if need[8] else None, b1_dt if need[9] else None), dt, out=d.mlp)
    else:
        dw2 = db2 = dw1 = db1 = None
        dy2 = h.new_zeros(h.shape)
    dh = None if dh is None else (dh if dh.is_contiguous() else dh.contiguous())
    if parts is None:
        dh_tot, dn2w, dn2b = r.ln_bwd(dy2, dh, h, n2w, s2, n2b_dt)
    else:
        dh_tot, dn2w, dn2b = _layer_norm_bwd_rows(dy2, dh, h, n2w, s2, parts[0], d.dh), None, None
    # attention branch
    da = dh_tot.view(rows, C)
    dout = r.linear_dx(da, wp, dt, dt, d.dout)
    dqkv = r.attention_grad(dout, qkv, o, lse, d.dqkv)
    if d_qkv is not None:
        dqkv = dqkv + d_qkv.reshape(dqkv.shape).to(dqkv.dtype)
    dy1 = r.linear_dx(dqkv, wqkv, dt, sd, d.dy1).view(B, N, C)
    d_in = dh_tot if d_xin is None else dh_tot + d_xin
    if parts is None:
        dx, dn1w, dn1b = r.ln_bwd(dy1, d_in, x_in, n1w, s1, n1b_dt)
    else:
        dx, dn1w, dn1b = _layer_norm_bwd_rows(dy1, d_in, x_in, n1w, s1, parts[1], d.dx), None, None
    (dwp, dbp), (dwqkv, dbqkv) = r.weight_grads(  # the projection's and qkv's in one launch
        (da, o, wp.dtype if need[4] else None, bp_dt if need[5] else None),
        (dqkv, y1, wqkv.dtype if need[2] else None, bqkv_dt if need[3] else None), dt, out=d.attn)
    return dx, (dn1w, dn1b, dwqkv, dbqkv, dwp, dbp, dn2w, dn2b, dw1, db1, dw2, db2)


_BIASES = (1, 3, 5, 7, 9, 11)  # the positions of a block's biases among its 12 parameters


class _VitBlocks(torch.autograd.Function):
    """(x, pending or None, H, eps, dt, n, taps, qk_block, the n blocks' 12 parameters each) ->
    (h, m, x_in of each block in ``taps``, qkv of block ``qk_block`` (when >= 0)): ``n`` blocks
    as one autograd node. Block i + 1 reads block i's (h, m) as its (x, pending); ``taps`` are
    blocks whose input x_in is handed out (block i's output is block i + 1's x_in; block 0's,
    x + pending, only with ``pending``)."""

    @staticmethod
    def forward(ctx, x, pending, H, eps, dt, n, taps, qk_block, *params):
        saved, aux, outs = [], [], []
        qkv_out = None
        ctx.pend_dt = None if pending is None else pending.dtype
        r = _route()
        stacked = r is _DIRECT and _one_width(params, n)
        acts = _stack_acts(x, pending is not None, n, H, params[8].shape[0], dt, True, taps, qk_block) \
            if stacked else None
        for i in range(n):
            p = params[12 * i:12 * i + 12]
            x_in, h, m, qkv, (y1, o, lse, y2, pre, s1, s2) = _forward(
                r, x, pending, p, H, eps, dt, True, _NEW_ACTS if acts is None else acts[i])
            saved += (x_in, y1, qkv, o, h, y2, pre, p[2], p[4], p[8], p[10], p[0], p[6])
            aux.append((s1, s2, lse, tuple(None if p[j] is None else p[j].dtype for j in _BIASES)))
            if i in taps:
                outs.append(x_in)
            if i == qk_block:
                qkv_out = qkv
            x, pending = h, m
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*saved)
        ctx.aux, ctx.dt, ctx.n, ctx.taps, ctx.qk_block, ctx.stacked = aux, dt, n, taps, qk_block, stacked
        norms = [params[12 * i + j] for i in range(n) for j in (0, 1, 6, 7)]  # the LayerNorms' w, b
        dtype = norms[0].dtype
        # one dtype and unit strides: their gradients from one reduction launch for the stack
        ctx.ln_dtype = dtype if all(t.dtype == dtype and t.stride(0) == 1 for t in norms) else None
        return (x, pending, *outs) if qkv_out is None else (x, pending, *outs, qkv_out)

    @staticmethod
    @first_order("vit_block")
    def backward(ctx, dh, dm, *rest):
        n, taps, qk_block, dt = ctx.n, ctx.taps, ctx.qk_block, ctx.dt
        d_taps = dict(zip(taps, rest))
        d_qkv = rest[len(taps)] if qk_block >= 0 else None
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[8:]
        r = _route()
        x_in = saved[0]
        C = x_in.shape[-1]
        rows = x_in.numel() // C if C else 0
        parts = per_norm = None
        if r is _DIRECT and ctx.ln_dtype is not None and rows:  # the LayerNorms' partial sums, all of them
            parts = torch.empty(2 * n, 2, _bwd_config(rows, C, x_in.device)[0], C, dtype=torch.float32,
                                device=x_in.device)
            per_norm = parts.unbind(0)  # block i: LN2's at 2 i, LN1's at 2 i + 1
        grads = [None] * (12 * n)
        dst = _stack_grads(saved, ctx.aux, need, n, dt) if r is _DIRECT and ctx.stacked and rows else None
        for i in range(n - 1, -1, -1):
            dx, grads[12 * i:12 * i + 12] = _backward(
                r, saved[13 * i:13 * i + 13], ctx.aux[i], dt, need[12 * i:12 * i + 12], d_taps.get(i), dh, dm,
                d_qkv if i == qk_block else None, None if parts is None else per_norm[2 * i:2 * i + 2],
                _NEW_GRADS if dst is None else dst[i])
            dh = dm = dx  # block i's x_in is h + m of block i - 1
        if parts is not None:  # per block LN2's weight, bias, then LN1's
            norms = layer_norm_dwdb(parts, ctx.ln_dtype).view(4 * n, C).unbind(0)
            for i in range(n):
                grads[12 * i + 6], grads[12 * i + 7], grads[12 * i], grads[12 * i + 1] = norms[4 * i:4 * i + 4]
        dpending = None if ctx.pend_dt is None else _cast(dx, ctx.pend_dt)
        return (dx, dpending, None, None, None, None, None, None, *grads)


_apply = eager_apply(_VitBlocks)


def _qk_views(qkv: torch.Tensor, B: int, N: int, H: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, N, d] as views of qkv [B N, 3C] ([B, N, 3, H, d])."""
    q, k, _ = qkv.view(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k


def vit_blocks(x: torch.Tensor, pending: Optional[torch.Tensor], params: Tuple[Optional[torch.Tensor], ...],
               num_heads: int, eps: float, taps: Tuple[int, ...] = (), qk_block: int = -1):
    """Triton path of ``tec_fast.ops.vit_blocks`` (inputs validated there): x [B, N, C] through
    len(params) // 12 blocks (``params``: each block's 12 tensors in ``vit_block``'s order),
    the first one adding ``pending`` to x. With a gradient to compute, all of them are one
    autograd node; without one (the frozen base) none is made and nothing is kept.
    Returns (h, m, (x_in of each block in ``taps``, ascending), (q, k) of block ``qk_block``
    as views [B, H, N, d] of its qkv, or None)."""
    dev = x.device.type
    dt = autocast_dtype(dev) or x.dtype
    n = len(params) // 12
    eps = float(eps)
    if torch.is_grad_enabled() and (x.requires_grad or (pending is not None and pending.requires_grad)
                                    or any(t is not None and t.requires_grad for t in params)):
        out = _apply(x, pending, num_heads, eps, dt, n, taps, qk_block, *params)
        h, m = out[0], out[1]
        outs, qkv = out[2:2 + len(taps)], (out[-1] if qk_block >= 0 else None)
    else:  # inference (the frozen base): no node
        outs, qkv, r = [], None, _route()
        acts = _stack_acts(x, pending is not None, n, num_heads, params[8].shape[0], dt, False, taps, qk_block) \
            if r is _DIRECT and _one_width(params, n) else None
        for i in range(n):
            x_in, x, pending, block_qkv, _ = _forward(r, x, pending, params[12 * i:12 * i + 12], num_heads, eps,
                                                       dt, False, _NEW_ACTS if acts is None else acts[i])
            if i in taps:
                outs.append(x_in)
            if i == qk_block:
                qkv = block_qkv
        h, m = x, pending
    B, N = h.shape[:2]
    return h, m, tuple(outs), (None if qkv is None else _qk_views(qkv, B, N, num_heads))


def vit_block(x: torch.Tensor, n1w: torch.Tensor, n1b: torch.Tensor, wqkv: torch.Tensor,
              bqkv: Optional[torch.Tensor], wp: torch.Tensor, bp: torch.Tensor, n2w: torch.Tensor,
              n2b: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              num_heads: int, eps: float = 1e-6, pending: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton path of ``tec_fast.ops.vit_block`` (inputs validated there): -> (x_in, h, m)."""
    params = (n1w, n1b, wqkv, bqkv, wp, bp, n2w, n2b, w1, b1, w2, b2)
    if pending is None:
        h, m, _, _ = vit_blocks(x, None, params, num_heads, eps)
        return x, h, m
    h, m, (x_in,), _ = vit_blocks(x, pending, params, num_heads, eps, (0,))
    return x_in, h, m


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], pending_dtype=None, **_info) -> List[str]:
    """Why this path cannot take x of ``dtype`` / ``shape`` (empty: it can)."""
    reasons = dtype_reasons(dtype)
    if shape and shape[-1] > MAX_C:
        reasons.append(f"width {shape[-1]} > {MAX_C} (the LayerNorm kernels hold one row in registers)")
    if pending_dtype is not None and torch.promote_types(dtype, pending_dtype) != dtype:
        reasons.append(f"pending is {pending_dtype}, wider than x's {dtype} (the kernels keep the residual "
                       f"stream x + pending in x's dtype)")
    return reasons
