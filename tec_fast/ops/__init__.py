"""Public kernel ops. Each validates its inputs (``validate.py``), then runs the Triton path or the
plain-torch reference (``dispatch.py``, which reads the op table in ``registry.py``).
The ``*_ragged`` forms (``ragged.py``, images of different lengths) are built from these ops.

The reference (``reference.py``) is the definition; the Triton paths live in the top-level
``kernels/`` directory (installed as ``tec_fast.kernels``), one op per file. Their custom ops are
registered when this package is imported (where Triton imports), so ``torch.compile`` and
``torch.library.opcheck`` find ``torch.ops.tec_fast.*`` in any order.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from tec_fast.config import MLP_ACTIVATIONS as _MLP_ACTIVATIONS
from tec_fast.ops import reference
from tec_fast.ops.dispatch import (dispatch_report, fast_impl, format_dispatch_report,
                                   register_kernels, use_fast_path, why_not_fast)
from tec_fast.ops.registry import OPS
from tec_fast.ops.validate import as_int as _as_int
from tec_fast.ops.validate import check_bias as _check_bias
from tec_fast.ops.validate import check_eps as _check_eps
from tec_fast.ops.validate import check_index as _check_index
from tec_fast.ops.validate import check_index_values as _check_index_values
from tec_fast.ops.validate import check_one_dtype as _check_one_dtype
from tec_fast.ops.validate import check_real as _check_real
from tec_fast.ops.validate import check_same_device as _check_same_device
from tec_fast.ops.validate import check_tensor as _check_tensor

__all__ = ["masked_gather", "scatter_masked", "patch_norm_mse", "relation_targets",
           "relation_loss", "encoder_adapter", "layer_norm", "mlp", "qkv_heads", "patch_embed", "vit_block", "vit_blocks",
           "patch_norm_mse_ragged",
           "relation_targets_ragged",
           "relation_loss_ragged", "reference", "dispatch_report",
           "format_dispatch_report", "why_not_fast", "OPS"]

register_kernels()


def masked_gather(x: torch.Tensor, ids_keep: torch.Tensor,
                  pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Visible-token gather fused with the position add.

    out[b, i] = x[b, ids_keep[b, i]] + pos[ids_keep[b, i]];  x [B, L, C], ids_keep [B, K],
    pos [L, C] or None. Differentiable w.r.t. x and pos.
    """
    _check_tensor(x, "x", 3)
    B, L, C = x.shape
    dev = x.device
    if not isinstance(ids_keep, torch.Tensor) or ids_keep.dim() != 2:
        raise ValueError(f"ids_keep must be a 2-D [B, K] index tensor, got "
                         f"{getattr(ids_keep, 'shape', type(ids_keep).__name__)}")
    _check_index(ids_keep, "ids_keep", (B, ids_keep.shape[1]), dev)
    if pos is not None:
        _check_tensor(pos, "pos", 2)
        if pos.shape != (L, C):
            raise ValueError(f"pos must have shape {(L, C)} to match x {tuple(x.shape)}, "
                             f"got {tuple(pos.shape)}")
        if pos.device != dev:
            _check_same_device(x, pos=pos)
    if use_fast_path("masked_gather", x):
        return fast_impl("masked_gather")(x, ids_keep, pos)  # its kernel checks the values
    _check_index_values(ids_keep, "ids_keep", L)
    return reference.masked_gather(x, ids_keep, pos)


def scatter_masked(vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoder input assembly: mask-token fill + unshuffle + position add in one pass.

    out[b, j] = (vis[b, r] if r < K else mask_token) + pos[j], r = ids_restore[b, j];
    vis [B, K, C], ids_restore [B, L] (a permutation of 0..L-1 per row), mask_token [C],
    pos [L, C] or None. Differentiable w.r.t. vis, mask_token and pos.
    """
    _check_tensor(vis, "vis", 3)
    B, K, C = vis.shape
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dim() != 2:
        raise ValueError(f"ids_restore must be a 2-D [B, L] index tensor, got "
                         f"{getattr(ids_restore, 'shape', type(ids_restore).__name__)}")
    L = ids_restore.shape[1]
    if L < K:
        raise ValueError(f"ids_restore has L={L} columns, fewer than the K={K} visible tokens of vis")
    _check_index(ids_restore, "ids_restore", (B, L), vis.device)
    if not isinstance(mask_token, torch.Tensor) or mask_token.numel() != C:
        raise ValueError(f"mask_token must hold C={C} values, got "
                         f"{getattr(mask_token, 'shape', type(mask_token).__name__)}")
    if not mask_token.is_floating_point():
        raise ValueError(f"mask_token must be floating point, got dtype {mask_token.dtype}")
    _check_same_device(vis, mask_token=mask_token)
    if pos is not None:
        _check_tensor(pos, "pos", 2)
        if pos.shape != (L, C):
            raise ValueError(f"pos must have shape {(L, C)}, got {tuple(pos.shape)}")
        _check_same_device(vis, pos=pos)
    if use_fast_path("scatter_masked", vis):
        return fast_impl("scatter_masked")(vis, ids_restore, mask_token, pos)  # its kernel checks the values
    _check_index_values(ids_restore, "ids_restore", L)
    return reference.scatter_masked(vis, ids_restore, mask_token.reshape(C), pos)


def patch_norm_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """Feature loss of docs/tec.md §3 (patch-dimension normalised target, unbiased variance).

    pred, target [B, L, C]; mask [B, L] (1 = removed patch, counted). Returns a 0-dim fp32
    tensor (float64 for float64 inputs); differentiable w.r.t. pred. A mask without a 1 gives
    NaN (0 / 0, as the formula does: checking for it would read the mask back to the host).
    """
    _check_tensor(pred, "pred", 3)
    _check_tensor(target, "target", 3)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    if pred.shape[1] < 2:
        raise ValueError(f"pred/target need L >= 2 patches for an unbiased variance, got L={pred.shape[1]}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(pred.shape[:2]):
        raise ValueError(f"mask must have shape {tuple(pred.shape[:2])}, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    if (pred.dtype is torch.float64) is not (target.dtype is torch.float64):
        raise ValueError(f"target has dtype {target.dtype} but pred has {pred.dtype}: the loss is computed in "
                         f"float64 when both are float64 and in fp32 otherwise, so not for one alone")
    if mask.is_complex():
        raise ValueError(f"mask must be real (bool, integer or floating point; 1 = removed patch), got dtype "
                         f"{mask.dtype}")
    _check_same_device(pred, target=target, mask=mask)
    eps = _check_real(eps, "eps", 0.0)
    if use_fast_path("patch_norm_mse", pred):
        return fast_impl("patch_norm_mse")(pred, target, mask, eps)
    return reference.patch_norm_mse(pred, target, mask, eps)


def _check_query_key(q: torch.Tensor, k: torch.Tensor) -> None:
    """q, k [B, H, N, d] of one attention: floating point, one shape, one dtype."""
    _check_tensor(q, "q", 4)
    _check_tensor(k, "k", 4)
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if q.dtype != k.dtype:
        raise ValueError(f"k has dtype {k.dtype} but q has {q.dtype} (q and k of one attention share one dtype)")


def relation_targets(q: torch.Tensor, k: torch.Tensor, topk: int,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Base-model relation targets (docs/tec.md §1) from its last block's q, k [B, H, N, d].

    Returns (relation [B, 1+topk, H, N-1] fp32 (float64 for float64 q, k), topk_idx [B, topk]
    int64). No gradient.
    """
    _check_query_key(q, k)
    _check_same_device(q, k=k)
    L = q.shape[2] - 1
    n_top = _as_int(topk)
    if n_top is None or not 1 <= n_top <= L:
        raise ValueError(f"topk must be an int in [1, {L}] (the number of patches), got {topk!r}")
    topk = n_top
    scale = _check_real(scale, "scale")
    if use_fast_path("relation_targets", q, topk=topk):
        return fast_impl("relation_targets")(q, k, topk, scale)
    with torch.no_grad():
        return reference.relation_targets(q, k, topk, scale)


def relation_loss(q: torch.Tensor, k: torch.Tensor, topk_idx: torch.Tensor, target: torch.Tensor,
                  tau: float, scale: float) -> torch.Tensor:
    """Relation loss of docs/tec.md §3 from the student's q, k [B, H, N, d].

    topk_idx [B, k] (patch indices, from the base model), target [B, 1+k, H, N-1] (the base's
    logits). Returns a 0-dim fp32 tensor (float64 for float64 q, k); differentiable w.r.t. q and k.
    """
    _check_query_key(q, k)
    B, H, N, d = q.shape
    L = N - 1
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != B:
        raise ValueError(f"topk_idx must be a [B={B}, k] index tensor, got "
                         f"{getattr(topk_idx, 'shape', type(topk_idx).__name__)}")
    kk = topk_idx.shape[1]
    if kk < 1:
        raise ValueError(f"topk_idx must hold k >= 1 patch indices per image, got shape {tuple(topk_idx.shape)}")
    _check_index(topk_idx, "topk_idx", (B, kk), q.device)
    _check_tensor(target, "target", 4)
    if tuple(target.shape) != (B, 1 + kk, H, L):
        raise ValueError(f"target must have shape {(B, 1 + kk, H, L)}, got {tuple(target.shape)}")
    _check_same_device(q, k=k, target=target)
    tau, scale = _check_real(tau, "tau", 0.0, open_low=True), _check_real(scale, "scale")
    if use_fast_path("relation_loss", q, topk=kk):  # its kernel checks the index values
        return fast_impl("relation_loss")(q, k, topk_idx, target, tau, scale)
    _check_index_values(topk_idx, "topk_idx", L)
    return reference.relation_loss(q, k, topk_idx, target, tau, scale)


def encoder_adapter(feats: torch.Tensor, ln_before_w: torch.Tensor, ln_before_b: torch.Tensor,
                    fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b,
                    ln_after_w: torch.Tensor, ln_after_b: torch.Tensor,
                    eps_before: float, eps_after: float) -> torch.Tensor:
    """Encoder adapter of docs/tec.md §2 on the stacked block outputs ``feats`` [D, B, T, C] -> [B, T, C].

    Arguments as ``reference.encoder_adapter`` (group weights: sequences indexed by g, or stacked
    tensors). ``tec_fast.models.adapter.EncoderAdapter`` is the module around it. Differentiable w.r.t.
    feats and every weight.
    """
    _check_tensor(feats, "feats", 4)
    D, B, T, C = feats.shape
    for name, ts in (("fuse_w", fuse_w), ("fuse_b", fuse_b), ("fc1_w", fc1_w), ("fc1_b", fc1_b),
                     ("fc2_w", fc2_w), ("fc2_b", fc2_b)):
        if not isinstance(ts, (list, tuple, torch.Tensor)):
            raise ValueError(f"{name} must be a list / tuple of per-group tensors or a stacked tensor, "
                             f"got {type(ts).__name__}")
    G = len(fuse_w)
    if G < 1 or D % G:
        raise ValueError(f"fuse_w holds G={G} groups, which must divide the depth D={D} of feats "
                         f"{tuple(feats.shape)}")
    M = D // G
    hidden = fc1_w[0].shape[0] if G else 0
    expected = {"ln_before_w": (D * C,), "ln_before_b": (D * C,), "ln_after_w": (C,), "ln_after_b": (C,)}
    given = {"ln_before_w": ln_before_w, "ln_before_b": ln_before_b, "ln_after_w": ln_after_w,
             "ln_after_b": ln_after_b}
    dev = feats.device
    named = []  # (name, tensor) of every weight, for the dtype check
    for name, t in given.items():
        if not isinstance(t, torch.Tensor) or t.shape != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for feats {tuple(feats.shape)}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        if t.device != dev:
            _check_same_device(feats, **{name: t})
        named.append((name, t))
    group_shapes = {"fuse_w": (C, M * C), "fuse_b": (C,), "fc1_w": (hidden, C), "fc1_b": (hidden,),
                    "fc2_w": (C, hidden), "fc2_b": (C,)}
    groups = {"fuse_w": fuse_w, "fuse_b": fuse_b, "fc1_w": fc1_w, "fc1_b": fc1_b, "fc2_w": fc2_w,
              "fc2_b": fc2_b}
    for name, ts in groups.items():
        if len(ts) != G:
            raise ValueError(f"{name} holds {len(ts)} groups, fuse_w holds {G}")
        shape = group_shapes[name]
        for g, t in enumerate(ts):  # the argument's name is built only for an error
            if not isinstance(t, torch.Tensor) or t.shape != shape:
                raise ValueError(f"{name}[{g}] must have shape {shape}, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            if t.device != dev:
                _check_same_device(feats, **{f"{name}[{g}]": t})
            named.append((f"{name}[{g}]", t))
    for name, t in named:
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    _check_one_dtype(feats, named, "feats and every weight", first="feats")
    eps_before, eps_after = _check_eps(eps_before, "eps_before"), _check_eps(eps_after, "eps_after")
    if use_fast_path("encoder_adapter", feats):
        return fast_impl("encoder_adapter")(feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b,
                    ln_after_w, ln_after_b, eps_before, eps_after)
    return reference.encoder_adapter(feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b,
                                     fc2_w, fc2_b, ln_after_w, ln_after_b, eps_before, eps_after)


# Ragged forms: compositions of the ops above (imported last: they call them).
from tec_fast.ops.ragged import (patch_norm_mse_ragged, relation_loss_ragged,  # noqa: E402
                                 relation_targets_ragged)


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ViT patch embedding, a stride-p convolution: images [B, C, S, S'] (S, S' multiples of p),
    weight [D, C, p, p], bias [D] or None -> [B, L, D], patches row-major.

    The Triton path gathers the patches once, in the GEMM's dtype, and runs one GEMM (on an H200
    cuDNN took 2.1 ms for this convolution at ViT-B, B=256, about 25x a GEMM's time for its FLOPs at
    the measured GEMM rate); it returns a contiguous tensor where the
    reference returns the convolution's transposed view. Differentiable w.r.t. weight and bias
    (and the images, on the reference path, which takes images that require a gradient).
    """
    _check_tensor(images, "images", 4)
    _check_tensor(weight, "weight", 4)
    D, C, p, p2 = weight.shape
    if p != p2 or p < 1:
        raise ValueError(f"weight must be [D, C, p, p] (square patches), got {tuple(weight.shape)}")
    B, Ci, H, W = images.shape
    if Ci != C:
        raise ValueError(f"images have {Ci} channels, weight {tuple(weight.shape)} takes {C}")
    if H % p or W % p or not H or not W:
        raise ValueError(f"images of {H}x{W} pixels do not split into {p}x{p} patches")
    _check_bias(bias, D, weight, images)
    _check_same_device(images, weight=weight)
    if weight.dtype != images.dtype or (bias is not None and bias.dtype != images.dtype):
        _check_one_dtype(images, (("weight", weight), ("bias", bias)), "images, weight and bias", first="images")
    if use_fast_path("patch_embed", images):
        return fast_impl("patch_embed")(images, weight, bias)
    return reference.patch_embed(images, weight, bias)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
               residual: Optional[torch.Tensor] = None):
    """A ViT block's LayerNorm, with the residual add before it fused in.

    Without ``residual``: y = LayerNorm(x) over the last dim. With it: h = residual + x (the
    block's new residual stream) and y = LayerNorm(h); returns (y, h). x, residual [..., C],
    weight, bias [C]. The Triton path reads x and residual once and writes h and y once, in x's
    dtype (under autocast eager LayerNorm would write fp32 that the next Linear casts back down).
    Differentiable w.r.t. x, residual, weight and bias.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor [..., C], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    C = x.shape[-1]
    dev = x.device
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor) and weight.shape == (C,)
            and bias.shape == (C,) and weight.device == dev and bias.device == dev):
        for name, t in (("weight", weight), ("bias", bias)):  # the error: which one, and why
            if not isinstance(t, torch.Tensor) or t.shape != (C,):
                raise ValueError(f"{name} must have shape ({C},) for x {tuple(x.shape)}, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            _check_same_device(x, **{name: t})
    if weight.dtype is not x.dtype or bias.dtype is not x.dtype:
        _check_norm_dtypes(x, weight, bias)
    eps = _check_eps(eps)
    if residual is None:
        if use_fast_path("layer_norm", x):
            return fast_impl("layer_norm")(x, weight, bias, eps)
        return reference.layer_norm(x, weight, bias, eps)
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got "
                         f"{getattr(residual, 'shape', type(residual).__name__)}")
    if residual.device != dev:
        _check_same_device(x, residual=residual)
    if residual.dtype is not x.dtype:
        _check_residual_dtype(x, residual, weight, bias)
    if use_fast_path("layer_norm", x, residual_dtype=residual.dtype):
        return fast_impl("layer_norm")(x, weight, bias, eps, residual)
    return reference.layer_norm(x, weight, bias, eps, residual)


_HALF = (torch.bfloat16, torch.float16)


def _check_norm_dtypes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """LayerNorm parameters: floating point; outside autocast of x's dtype, or both fp32 for a
    16-bit x (parameters kept in fp32, as torch's LayerNorm takes them)."""
    for name, t in (("weight", weight), ("bias", bias)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    if torch.is_autocast_enabled(x.device.type) or (x.dtype in _HALF and weight.dtype is torch.float32
                                                     and bias.dtype is torch.float32):
        return
    _check_one_dtype(x, (("weight", weight), ("bias", bias)),
                     "x, weight and bias (or fp32 weight and bias for a 16-bit x)")


def _check_residual_dtype(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor) -> None:
    """A residual of another dtype than x: floating point, and outside autocast h = x + residual
    (of the promoted dtype) normalisable with these parameters, as x is."""
    if not residual.is_floating_point():
        raise ValueError(f"residual must be floating point, got dtype {residual.dtype}")
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    if torch.is_autocast_enabled(x.device.type) or weight.dtype is h_dtype and bias.dtype is h_dtype \
            or (h_dtype in _HALF and weight.dtype is torch.float32 and bias.dtype is torch.float32):
        return
    raise ValueError(f"residual has dtype {residual.dtype}, so x + residual is {h_dtype}, which weight "
                     f"({weight.dtype}) and bias ({bias.dtype}) do not match (outside autocast they must "
                     f"have h's dtype, or be fp32 for a 16-bit h)")


def qkv_heads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's fused q/k/v projection split into heads: q, k, v = the [B, N, 3, H, d] view of
    ``F.linear(x, weight, bias)``, each transposed to [B, H, N, d] (views, no copy).

    x [B, N, C], weight [3 H d, C], bias [3 H d] or None. The Triton path's backward packs the
    heads' gradients into the projection's layout and sums the bias gradient in the same pass
    (in fp32); autograd would pack them, then read the packed gradient again for the bias.
    Differentiable w.r.t. x, weight and bias.
    """
    _check_tensor(x, "x", 3)
    _check_tensor(weight, "weight", 2)
    heads = _as_int(num_heads)
    if heads is None or heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    num_heads = heads
    out, C = weight.shape
    if C != x.shape[-1] or out % (3 * num_heads):
        raise ValueError(f"weight must be [3 * num_heads * head_dim, C={x.shape[-1]}] with num_heads="
                         f"{num_heads}, got {tuple(weight.shape)}")
    _check_bias(bias, out, weight, x)
    if weight.device != x.device:
        _check_same_device(x, weight=weight)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        _check_one_dtype(x, (("weight", weight), ("bias", bias)), "x, weight and bias")
    if use_fast_path("qkv_heads", x, head_dim=out // (3 * num_heads)):
        return fast_impl("qkv_heads")(x, weight, bias, num_heads)
    return reference.qkv_heads(x, weight, bias, num_heads)


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        act: str = "gelu") -> torch.Tensor:
    """A transformer block's MLP, fc2(act(fc1(x))), as ``Linear -> activation -> Linear``.

    x [..., C], w1 [Hd, C], b1 [Hd], w2 [Cout, Hd], b2 [Cout] -> [..., Cout]; ``act`` one of
    gelu (exact erf), gelu_tanh, quick_gelu. The Triton path (exact GELU) saves x and the
    pre-activation for backward but not the activation, which its backward kernel recomputes
    together with the GELU derivative and b1's gradient. Differentiable w.r.t. all five tensors.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor [..., C], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if act not in _MLP_ACTIVATIONS:
        raise ValueError(f"act must be one of {_MLP_ACTIVATIONS}, got {act!r}")
    C, dev = x.shape[-1], x.device
    tensors = (("w1", w1, 2), ("b1", b1, 1), ("w2", w2, 2), ("b2", b2, 1))
    for name, t, ndim in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() != ndim or not t.is_floating_point():
            raise ValueError(f"{name} must be a {ndim}-D floating-point tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != dev:
            _check_same_device(x, **{name: t})
    hidden, out_dim = w1.shape[0], w2.shape[0]
    if w1.shape[1] != C or b1.shape[0] != hidden or w2.shape[1] != hidden or b2.shape[0] != out_dim:
        expected = {"w1": (hidden, C), "b1": (hidden,), "w2": (out_dim, hidden), "b2": (out_dim,)}
        name, t = next((n, t) for n, t, _ in tensors if t.shape != expected[n])
        raise ValueError(f"{name} must have shape {expected[name]} for x {tuple(x.shape)} and "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}; got {tuple(t.shape)}")
    dt = x.dtype
    if w1.dtype != dt or b1.dtype != dt or w2.dtype != dt or b2.dtype != dt:
        _check_one_dtype(x, ((n, t) for n, t, _ in tensors), "all five")
    if use_fast_path("mlp", x, act=act):
        return fast_impl("mlp")(x, w1, b1, w2, b2)
    return reference.mlp(x, w1, b1, w2, b2, act)


_BLOCK_PARAMS = ("norm1_weight", "norm1_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
                 "norm2_weight", "norm2_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def vit_block(x: torch.Tensor, norm1_weight: torch.Tensor, norm1_bias: torch.Tensor, qkv_weight: torch.Tensor,
              qkv_bias: Optional[torch.Tensor], proj_weight: torch.Tensor, proj_bias: torch.Tensor,
              norm2_weight: torch.Tensor, norm2_bias: torch.Tensor, fc1_weight: torch.Tensor,
              fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, num_heads: int,
              eps: float = 1e-6, pending: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pre-norm ViT block (LayerNorm, multi-head self-attention, LayerNorm, exact-GELU MLP)
    split at its closing residual add.

    x [B, N, C] -> (x_in, h, m): x_in = x + pending (x itself without ``pending``),
    h = x_in + proj(attention(LN1(x_in))), m = fc2(GELU(fc1(LN2(h)))); the block's output is
    h + m (``Block`` adds it inside the next block's LN1 by passing m as that block's
    ``pending``). The parameters are those of timm's ``Block`` (``norm1.weight``, ``attn.qkv.weight``
    [3C, C], ``attn.proj.weight`` [C, C], ``mlp.fc1.weight`` [hidden, C], ``mlp.fc2.weight``
    [C, hidden], their biases; ``qkv_bias`` may be None); both LayerNorms use ``eps``. The Triton
    path is one autograd node for the whole block, every kernel of it this package's (GEMMs
    with the bias, GELU and bias gradients in their epilogues, flash attention, the LayerNorms;
    its backward written out); the reference runs the same math op by op through torch.
    Differentiable w.r.t. x, pending and every parameter.
    """
    _check_tensor(x, "x", 3)
    heads = _as_int(num_heads)
    if heads is None or heads < 1 or x.shape[2] % heads:
        raise ValueError(f"num_heads must be a positive int dividing C={x.shape[2]}, got {num_heads!r}")
    num_heads = heads
    tensors = (norm1_weight, norm1_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, norm2_weight, norm2_bias,
               fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if not _block_tensors_ok(x, tensors):
        _check_block_tensors(x, tensors)
    if pending is not None:
        if not isinstance(pending, torch.Tensor) or pending.shape != x.shape or not pending.is_floating_point():
            raise ValueError(f"pending must be a floating-point tensor of x's shape {tuple(x.shape)}, got "
                             f"{getattr(pending, 'dtype', type(pending).__name__)} "
                             f"{tuple(getattr(pending, 'shape', ()))}")
        if pending.device != x.device:
            _check_same_device(x, pending=pending)
    eps = _check_eps(eps)
    if pending is not None and pending.dtype is not x.dtype:  # x_in = x + pending in the promoted dtype
        fast = use_fast_path("vit_block", x, pending_dtype=pending.dtype)
    else:
        fast = use_fast_path("vit_block", x)
    if fast:
        return fast_impl("vit_block")(x, *tensors, num_heads, eps, pending)
    return reference.vit_block(x, *tensors, num_heads, eps, pending)


def vit_blocks(x: torch.Tensor, params: Sequence[Sequence[Optional[torch.Tensor]]], num_heads: int,
               eps: float = 1e-6, outputs: Sequence[int] = (), qk_block: Optional[int] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...],
                          Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """``vit_block`` over a stack of blocks: x [B, N, C] through len(params) blocks, block i + 1
    reading block i's (h, m) as its (x, pending). ``params``: per block the twelve tensors
    ``vit_block`` takes, in its order (``qkv_bias`` may be None).

    Returns (h, m, outs, qk): the last block's output is h + m; ``outs``, one tensor per entry of
    ``outputs``, the output of block i (i < len(params) - 1: the last one's is h + m); ``qk``, the
    (q, k) [B, H, N, d] of block ``qk_block``'s attention (views of its qkv projection), or None.
    The Triton path (the same decision and kernels as ``vit_block``) makes the whole stack one
    autograd node, or none without a gradient to compute; the reference runs ``vit_block``'s
    reference block after block (block ``qk_block`` part by part, to hand out q and k).
    Differentiable w.r.t. x and every parameter (through outs and qk too).
    """
    _check_tensor(x, "x", 3)
    heads = _as_int(num_heads)
    if heads is None or heads < 1 or x.shape[2] % heads:
        raise ValueError(f"num_heads must be a positive int dividing C={x.shape[2]}, got {num_heads!r}")
    num_heads = heads
    if isinstance(params, torch.Tensor) or not isinstance(params, Sequence) or not params:
        raise ValueError(f"params must be a non-empty sequence of per-block tuples of 12 tensors, got "
                         f"{type(params).__name__}")
    n = len(params)
    flat = []
    for i, tensors in enumerate(params):
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence) or len(tensors) != 12:
            raise ValueError(f"params[{i}] must be a sequence of the block's 12 tensors ({', '.join(_BLOCK_PARAMS)}), "
                             f"got {type(tensors).__name__} of length {len(tensors) if hasattr(tensors, '__len__') else '?'}")
        tensors = tuple(tensors)
        if not _block_tensors_ok(x, tensors):
            try:
                _check_block_tensors(x, tensors)
            except ValueError as exc:
                raise ValueError(f"params[{i}]: {exc}") from None
        flat += tensors
    if isinstance(outputs, (torch.Tensor, str)) or not isinstance(outputs, Sequence):
        raise ValueError(f"outputs must be a sequence of block indices, got {type(outputs).__name__} {outputs!r}")
    indices = tuple(_as_int(i) for i in outputs)
    for i, given in zip(indices, outputs):
        if i is None or not 0 <= i < n - 1:
            raise ValueError(f"outputs must hold block indices in [0, {n - 1}) (the last block's output is h + m), "
                             f"got {given!r}")
    outputs = indices
    if qk_block is not None:
        block = _as_int(qk_block)
        if block is None or not 0 <= block < n:
            raise ValueError(f"qk_block must be None or a block index in [0, {n}), got {qk_block!r}")
        qk_block = block
    eps = _check_eps(eps)
    if use_fast_path("vit_block", x):
        taps = tuple(sorted({i + 1 for i in outputs}))
        h, m, tapped, qk = fast_impl("vit_block", "vit_blocks")(x, None, tuple(flat), num_heads, eps, taps,
                                                                 -1 if qk_block is None else qk_block)
        by_block = dict(zip(taps, tapped))
        return h, m, tuple(by_block[i + 1] for i in outputs), qk
    return reference.vit_blocks(x, params, num_heads, eps, outputs, qk_block)


def _block_shapes(C: int, hidden: int, qkv_bias: bool) -> tuple:
    return ((C,), (C,), (3 * C, C)) + (((3 * C,),) if qkv_bias else ()) + \
        ((C, C), (C,), (C,), (C,), (hidden, C), (hidden,), (C, hidden), (C,))


def _block_tensors_ok(x: torch.Tensor, tensors: tuple) -> bool:
    """The common case, checked in one pass over the twelve (about 3 us): tensors of the block's
    shapes on x's device, of x's dtype (any floating dtype under autocast)."""
    present = tensors[:3] + tensors[4:] if tensors[3] is None else tensors  # qkv_bias may be None
    w1 = tensors[8]
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2:
        return False
    dev, dt = x.device, x.dtype
    one_dtype = True
    for t, shape in zip(present, _block_shapes(x.shape[2], w1.shape[0], len(present) == 12)):
        if not isinstance(t, torch.Tensor) or t.shape != shape or t.device != dev:
            return False
        if t.dtype is not dt:
            one_dtype = False
    return one_dtype or (torch.is_autocast_enabled(dev.type) and all(t.is_floating_point() for t in present))


def _check_block_tensors(x: torch.Tensor, tensors: tuple) -> None:
    """The error ``_block_tensors_ok`` found, naming the tensor."""
    C = x.shape[2]
    fc1 = tensors[8]
    hidden = fc1.shape[0] if isinstance(fc1, torch.Tensor) and fc1.dim() == 2 else -1
    shapes = _block_shapes(C, hidden, True)
    dev = x.device
    for name, t, shape in zip(_BLOCK_PARAMS, tensors, shapes):
        if t is None and name == "qkv_bias":
            continue
        if not isinstance(t, torch.Tensor) or t.shape != shape or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape {shape} for x {tuple(x.shape)} "
                             f"(hidden={hidden}), got {getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.device != dev:
            _check_same_device(x, **{name: t})
    _check_one_dtype(x, zip(_BLOCK_PARAMS, tensors), "the block's tensors")
