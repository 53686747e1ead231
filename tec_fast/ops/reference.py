"""Plain-PyTorch references of every op: the definitions the kernels are tested against.

Each function is the op's meaning written as directly as torch allows (docs/tec.md). No input
checking here: the public wrappers in ``tec_fast.ops`` validate before dispatching.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from tec_fast.config import MLP_ACTIVATIONS


def _autocast_off(t: torch.Tensor):
    """A context with autocast off on ``t``'s device: the relation logits are computed in fp32
    (or float64) under autocast too, as the kernels compute them (autocast would run their
    matrix products in bf16 and change the base's top-k)."""
    device_type = t.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the losses, the relations and the base's target features are computed in
    for inputs of ``dtype``: fp32, or float64 for float64 input (a float64 model is computed in
    float64 throughout, e.g. for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(loss_dtype(t.dtype))


def masked_gather(x: torch.Tensor, ids_keep: torch.Tensor,
                  pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[b, i] = x[b, ids_keep[b, i]] + pos[ids_keep[b, i]];  x [B, L, C], ids [B, K], pos [L, C]."""
    C = x.shape[-1]
    out = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, C))  # [B, K, C]
    if pos is not None:
        out = out + pos[ids_keep]
    return out


def scatter_masked(vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoder input assembly: out[b, j] = (vis[b, r] if r < K else mask_token) + pos[j],
    r = ids_restore[b, j];  vis [B, K, C], ids_restore [B, L], mask_token [C], pos [L, C]."""
    B, K, C = vis.shape
    L = ids_restore.shape[1]
    full = torch.cat([vis, mask_token.reshape(1, 1, C).to(vis.dtype).expand(B, L - K, C)], dim=1)
    out = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, C))  # [B, L, C]
    if pos is not None:
        out = out + pos
    return out


def patch_norm_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """docs/tec.md §3 feature loss. The target is normalised per image and channel over the L
    patches with the *unbiased* variance; squared error averaged over channels, then over the
    masked patches. Computed in fp32 (float64 for float64 input). No gradient reaches the target."""
    target = _acc(target.detach())
    mean = target.mean(dim=1, keepdim=True)
    var = target.var(dim=1, keepdim=True)
    target = (target - mean) / torch.sqrt(var + eps)
    per_patch = ((_acc(pred) - target) ** 2).mean(dim=-1)  # [B, L]
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def relation_targets(q: torch.Tensor, k: torch.Tensor, topk: int,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """docs/tec.md §1 relation targets from the base model's last-block q, k [B, H, N, d].

    ranking r = head-mean of the CLS row's logits at the patch columns; idx = topk(r);
    relation [B, 1+k, H, L] = logits of the CLS row and rows idx+1 at the patch columns.
    Only the 1+k rows are computed (never N x N). Output dtype: fp32 (float64 for float64 input).
    """
    B, H, N, d = q.shape
    with _autocast_off(q):
        qf, kf = _acc(q), _acc(k)
        cls_row = torch.einsum("bhd,bhnd->bhn", qf[:, :, 0], kf[:, :, 1:]) * scale  # [B, H, L]
        topk_idx = torch.topk(cls_row.mean(dim=1), topk, dim=1, largest=True).indices  # [B, k]
        q_top = torch.gather(qf, 2, (topk_idx + 1)[:, None, :, None].expand(B, H, topk, d))
        top_rows = torch.einsum("bhkd,bhnd->bhkn", q_top, kf[:, :, 1:]) * scale  # [B, H, k, L]
        relation = torch.cat([cls_row.unsqueeze(2), top_rows], dim=2).permute(0, 2, 1, 3)
    return relation.contiguous(), topk_idx  # [B, 1+k, H, L], [B, k]


def relation_loss(q: torch.Tensor, k: torch.Tensor, topk_idx: torch.Tensor, target: torch.Tensor,
                  tau: float, scale: float) -> torch.Tensor:
    """docs/tec.md §3 relation loss from the student's q, k [B, H, N, d].

    R [B, 1+k, H, L] = logits of query rows (CLS, idx+1) against the patch keys, times scale;
    loss = mean over (b, row, head) of -sum_j softmax(target / tau)_j * log_softmax(R)_j.
    """
    B, H, N, d = q.shape
    kk = topk_idx.shape[1]
    rows = torch.cat([torch.zeros_like(topk_idx[:, :1]), topk_idx + 1], dim=1)  # [B, 1+k]
    with _autocast_off(q):
        q_rows = torch.gather(_acc(q), 2, rows[:, None, :, None].expand(B, H, 1 + kk, d))
        logits = torch.einsum("bhrd,bhnd->brhn", q_rows, _acc(k)[:, :, 1:]) * scale
        p = F.softmax(_acc(target.detach()).to(logits.dtype) / tau, dim=-1)  # the base's logits: no gradient
        return -(p * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def encoder_adapter(feats: torch.Tensor, ln_before_w: torch.Tensor, ln_before_b: torch.Tensor,
                    fuse_w: torch.Tensor, fuse_b: torch.Tensor,
                    fc1_w: torch.Tensor, fc1_b: torch.Tensor,
                    fc2_w: torch.Tensor, fc2_b: torch.Tensor,
                    ln_after_w: torch.Tensor, ln_after_b: torch.Tensor,
                    eps_before: float, eps_after: float) -> torch.Tensor:
    """docs/tec.md §2 encoder adapter on the stacked block outputs ``feats`` [D, B, T, C].

    Group weights are sequences (or stacked tensors) indexed by g: fuse_w[g] [C, M*C],
    fuse_b[g] [C], fc1_w[g] [Hd, C], fc1_b[g] [Hd], fc2_w[g] [C, Hd], fc2_b[g] [C] (M = D/G). Z = concat_d feats[d] along channels (block 0
    first); Z' = LN_{D*C}(Z); u_g = Z'[g-th M*C chunk] @ fuse_w[g]^T + fuse_b[g];
    u_g += MLP_g(u_g); out = LN_C(sum_g u_g)  -> [B, T, C].
    """
    D, B, T, C = feats.shape
    G = len(fuse_w)
    z = feats.permute(1, 2, 0, 3).reshape(B, T, D * C)
    z = F.layer_norm(z, (D * C,), ln_before_w, ln_before_b, eps_before)
    out = 0
    for g, chunk in enumerate(z.chunk(G, dim=-1)):
        u = F.linear(chunk, fuse_w[g], fuse_b[g])
        u = u + F.linear(F.gelu(F.linear(u, fc1_w[g], fc1_b[g])), fc2_w[g], fc2_b[g])
        out = out + u
    return F.layer_norm(out, (C,), ln_after_w, ln_after_b, eps_after)


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The ViT patch embedding: the stride-p convolution with weight [D, C, p, p], [B, C, S, S] ->
    [B, L, D] (patches row-major; a transposed view of the convolution's output)."""
    return F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)


def qkv_heads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int):
    """A block's q/k/v projection split into heads: x [B, N, C] -> q, k, v [B, H, N, d], views of
    ``F.linear(x, weight, bias)`` seen as [B, N, 3, H, d] (timm's layout of the fused projection)."""
    B, N, _ = x.shape  # the head width spelled out: a reshape cannot infer it for an empty batch
    qkv = F.linear(x, weight, bias).reshape(B, N, 3, num_heads, weight.shape[0] // (3 * num_heads))
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: Optional[torch.Tensor] = None):
    """LayerNorm over the last dim of x, or of h = x + residual; returns y, or (y, h)."""
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    h = residual + x
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


def mlp_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """One of ``MLP_ACTIVATIONS``: ``gelu`` (exact erf: timm, MAE, HF), ``gelu_tanh`` (tanh
    approximation), ``quick_gelu`` (x * sigmoid(1.702 x), OpenAI CLIP)."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown MLP activation {name!r}; one of {', '.join(MLP_ACTIVATIONS)}")


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        act: str = "gelu") -> torch.Tensor:
    """Transformer MLP: fc2(act(fc1(x))); x [..., C], w1 [Hd, C], b1 [Hd], w2 [Cout, Hd], b2 [Cout]."""
    return F.linear(mlp_activation(act, F.linear(x, w1, b1)), w2, b2)


def vit_block(x: torch.Tensor, norm1_weight: torch.Tensor, norm1_bias: torch.Tensor, qkv_weight: torch.Tensor,
              qkv_bias: Optional[torch.Tensor], proj_weight: torch.Tensor, proj_bias: torch.Tensor,
              norm2_weight: torch.Tensor, norm2_bias: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
              fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, num_heads: int, eps: float = 1e-6,
              pending: Optional[torch.Tensor] = None):
    """A pre-norm ViT block with exact-GELU MLP, split at its closing residual add: x [B, N, C]
    -> (x_in, h, m), x_in = x + pending (x without one), h = x_in + proj(attn(LN1(x_in))),
    m = fc2(GELU(fc1(LN2(h)))); the block's output is h + m. The same torch calls, in the same
    order, as ``Block`` made through the separate ops' references."""
    x_in, h, m, _ = _vit_block_qk(x, norm1_weight, norm1_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                  norm2_weight, norm2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, num_heads,
                                  eps, pending)
    return x_in, h, m


def _vit_block_qk(x, norm1_weight, norm1_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, norm2_weight,
                  norm2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, num_heads, eps, pending):
    """``vit_block`` -> (x_in, h, m, (q, k)), q and k [B, H, N, d] as the attention read them."""
    B, N, C = x.shape
    if pending is None:
        x_in, y1 = x, layer_norm(x, norm1_weight, norm1_bias, eps)
    else:
        y1, x_in = layer_norm(pending, norm1_weight, norm1_bias, eps, residual=x)
    q, k, v = qkv_heads(y1, qkv_weight, qkv_bias, num_heads)
    a = F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C), proj_weight, proj_bias)
    y2, h = layer_norm(a, norm2_weight, norm2_bias, eps, residual=x_in)
    return x_in, h, mlp(y2, fc1_weight, fc1_bias, fc2_weight, fc2_bias), (q, k)


def vit_blocks(x: torch.Tensor, params, num_heads: int, eps: float = 1e-6, outputs=(), qk_block=None):
    """``vit_block`` block after block (block i + 1 reads block i's (h, m) as its (x, pending))
    -> (h, m, the output of each block in ``outputs``, (q, k) of block ``qk_block`` or None)."""
    pending, taps, qk = None, {}, None
    for i, tensors in enumerate(params):
        x_in, x, pending, block_qk = _vit_block_qk(x, *tensors, num_heads, eps, pending)
        taps[i - 1] = x_in
        if i == qk_block:
            qk = block_qk
    return x, pending, tuple(taps[i] for i in outputs), qk
