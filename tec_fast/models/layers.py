"""ViT building blocks shared by the base model, the new model and the MAE base pretrainer.

Parameter names follow timm / MAE (``patch_embed.proj``, ``blocks.{i}.norm1``, ``attn.qkv``,
``attn.proj``, ``mlp.fc1``, ...) so released checkpoints load by name.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tec_fast import ops
from tec_fast.config import MLP_ACTIVATIONS, check_mlp_ratio, check_positive_int, is_real
from tec_fast.ops.attention import packed_attention

LN_EPS = 1e-6  # every ViT LayerNorm (timm/MAE use partial(nn.LayerNorm, eps=1e-6))


def sincos_pos_embed(dim: int, grid_h: int, grid_w: Optional[int] = None,
                     cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding in MAE's layout, [1 + gh*gw, dim] (row 0 = CLS = 0).

    First dim/2 channels encode the column, last dim/2 the row; each half is
    [sin(pos * w_i)] + [cos(pos * w_i)], w_i = 10000^(-i / (dim/4)). Computed in float64 like
    MAE's numpy code, returned as float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got dim={dim}")
    grid_w = grid_h if grid_w is None else grid_w
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


class PatchEmbed(nn.Module):
    """Stride-p convolution, images [B, 3, S, S] -> [B, L, C] (patches row-major), or the same
    conv as a matmul on flattened patches [T, 3*p*p] (conv-weight order (c, y, x), native
    resolution) -> [T, C]. ``bias=False``: CLIP. Outside autocast the pixels are cast to the
    weight's dtype (a model cast to bf16 takes fp32 pixels)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight, self.proj.bias
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        if x.dim() == 4:
            return ops.patch_embed(x, w, b)
        return F.linear(x, w.reshape(w.shape[0], -1), b)


class Mlp(nn.Module):
    """Linear -> activation -> Linear (``fc1``, ``fc2``: timm's names), through ``ops.mlp``.
    ``act``: ``gelu`` (exact erf, timm/MAE/HF), ``gelu_tanh`` (tanh approximation), ``quick_gelu``
    (x * sigmoid(1.702 x), OpenAI's CLIP towers)."""

    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None, act: str = "gelu"):
        super().__init__()
        if act not in MLP_ACTIVATIONS:
            raise ValueError(f"unknown MLP activation {act!r}; one of {', '.join(MLP_ACTIVATIONS)}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.act)

    def extra_repr(self) -> str:
        return f"act={self.act}"


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``; on a packed sequence
    ([T, C] with ``cu_seqlens``) block-diagonal attention through ``attention.packed_attention``.

    With ``return_qk=True`` also returns q and k ([B, H, N, d], or [T, H, d] packed) so a caller
    can compute the few attention-logit rows it needs (the base model's relation targets) without
    an N x N matrix. The batched path projects through ``ops.qkv_heads`` with ``qkv``'s weight
    and bias (its backward packs the heads' gradients and sums the bias gradient in one pass),
    so hooks registered on the ``qkv`` module itself do not fire there.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_qk: bool = False,
                cu_seqlens: Optional[torch.Tensor] = None, max_len: int = 0, lengths=None):
        if cu_seqlens is not None:  # packed: x [T, C], images delimited by cu_seqlens
            T, C = x.shape
            q, k, v = self.qkv(x).reshape(T, 3, self.num_heads, self.head_dim).unbind(1)  # [T, H, d]
            out = self.proj(packed_attention(q, k, v, cu_seqlens, max_len, lengths=lengths).reshape(T, C))
            return (out, (q, k)) if return_qk else out
        B, N, C = x.shape
        q, k, v = ops.qkv_heads(x, self.qkv.weight, self.qkv.bias, self.num_heads)  # each [B, H, N, d]
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return (out, (q, k)) if return_qk else out


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (``gamma``, as timm / DINOv2 / DeiT-III name it)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x += LS1(Attn(LN1(x))); x += LS2(MLP(LN2(x))).

    The keyword arguments describe released base models (DINOv2, DeiT-III, CLIP, HF); their
    defaults are the plain block (no LayerScale) that the new model uses.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, layer_scale: bool = False,
                 qkv_bias: bool = True, ln_eps: float = LN_EPS, act: str = "gelu"):
        super().__init__()
        check_positive_int(dim, "Block.dim")
        check_positive_int(num_heads, "Block.num_heads")
        if dim % num_heads:
            raise ValueError(f"Block.dim ({dim}) must be divisible by Block.num_heads ({num_heads})")
        check_mlp_ratio(mlp_ratio, dim, "Block.mlp_ratio", "dim")
        for name, value in (("layer_scale", layer_scale), ("qkv_bias", qkv_bias)):
            if not isinstance(value, bool):
                raise ValueError(f"Block.{name} must be a bool, got {value!r}")
        if not (is_real(ln_eps) and 0 < ln_eps < 1):
            raise ValueError(f"Block.ln_eps must be a float in (0, 1), got {ln_eps!r}")
        if act not in MLP_ACTIVATIONS:
            raise ValueError(f"Block.act must be one of {MLP_ACTIVATIONS}, got {act!r}")
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, return_qk: bool = False,
                cu_seqlens: Optional[torch.Tensor] = None, max_len: int = 0, lengths=None, *,
                pending: Optional[torch.Tensor] = None, split: bool = False):
        """x [B, N, C], or a packed [T, C] with ``cu_seqlens``, -> the block's output (and q, k
        with ``return_qk``). Each residual add is fused into the LayerNorm after it
        (``ops.layer_norm(branch, residual=stream)``: one read of the stream and the branch, one
        write of the new stream and the normalised input).

        ``split=True`` (``run_blocks``) leaves the closing residual add out and returns
        (x_in, h, m, qk), the block's output being h + m; ``pending``, the previous block's m, is
        then added to x inside norm1 (x_in is that sum: the previous block's output). Through
        ``__call__`` like any forward, so module hooks (FSDP2's unsharding) run.

        A plain block (no LayerScale, exact GELU, its parts neither replaced nor hooked) on a
        batched sequence without ``return_qk`` is one ``ops.vit_block`` call: one autograd node
        for the whole block instead of one per part."""
        n1, n2 = self.norm1, self.norm2
        tensors = _one_op_tensors(self) if cu_seqlens is None and not return_qk and n1.eps == n2.eps else None
        if tensors is not None:
            x_in, h, m = ops.vit_block(x, *tensors, self.attn.num_heads, n1.eps, pending=pending)
            return (x_in, h, m, None) if split else h + m
        if pending is None:
            y1 = ops.layer_norm(x, n1.weight, n1.bias, n1.eps)
        else:
            y1, x = ops.layer_norm(pending, n1.weight, n1.bias, n1.eps, residual=x)
        packed = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens, max_len=max_len, lengths=lengths)
        if return_qk:
            a, qk = self.attn(y1, return_qk=True, **packed)
        else:
            a, qk = self.attn(y1, **packed), None
        y, h = ops.layer_norm(self.ls1(a), n2.weight, n2.bias, n2.eps, residual=x)
        m = self.ls2(self.mlp(y))
        if split:
            return x, h, m, qk
        x = h + m
        return (x, qk) if return_qk else x


_PLAIN_PARTS = (nn.LayerNorm, Attention, nn.Linear, nn.Identity, Mlp)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _one_op_tensors(block: Block, global_hooks_checked: bool = False) -> Optional[tuple]:
    """The twelve tensors ``ops.vit_block`` takes from ``block`` (norm1, attn.qkv, attn.proj,
    norm2, mlp.fc1, mlp.fc2: weight and bias each), or None where the op would not compute
    exactly what the block's parts do: LayerScale (not a part the op has), another MLP
    activation than the exact GELU, a part replaced by another class (a wrapped or
    parametrized layer) or carrying a hook (such as fine-tuning's drop path on ls1 / ls2: it
    must see its part run), a module hook registered globally, a parameter that is not one.
    The block's own hooks run around its forward as usual. Read straight from the modules'
    dictionaries (a per-call cost of the block's forward, about 2 us); ``global_hooks_checked``:
    the caller has found no global module hook."""
    mods = block._modules
    for part in mods.values():
        if type(part) not in _PLAIN_PARTS or _hooked(part):
            return None
        for layer in part._modules.values():  # attn's qkv / proj, mlp's fc1 / fc2
            if type(layer) is not nn.Linear or _hooked(layer):
                return None
    if not global_hooks_checked and _global_hooks():
        return None
    if mods["mlp"].act != "gelu":  # the op's MLP is the exact-erf GELU's
        return None
    attn, mlp = mods["attn"]._modules, mods["mlp"]._modules
    tensors = []
    for layer in (mods["norm1"], attn["qkv"], attn["proj"], mods["norm2"], mlp["fc1"], mlp["fc2"]):
        params = layer._parameters
        tensors += (params.get("weight"), params.get("bias"))
    if any(t is None for i, t in enumerate(tensors) if i != 3):  # only qkv's bias may be absent
        return None
    return tuple(tensors)


def _global_hooks() -> bool:
    glob = nn.modules.module
    return bool(glob._global_forward_hooks or glob._global_forward_pre_hooks or glob._global_backward_hooks
                or glob._global_backward_pre_hooks)


def _one_op_stack(blocks: Sequence[Block]) -> Optional[tuple]:
    """(per block the tensors of ``_one_op_tensors``, heads, eps) where every block of
    ``blocks`` is a plain ``Block`` (not a subclass, no hooks of its own) that ``_one_op_tensors``
    takes, all with the same heads and LayerNorm eps: what ``ops.vit_blocks`` computes exactly
    as the blocks' own forwards would. None otherwise (the blocks then run one by one)."""
    if _global_hooks() or type(blocks[0]) is not Block:
        return None
    first = blocks[0]._modules
    heads, eps = first["attn"].num_heads, first["norm1"].eps
    params = []
    for blk in blocks:
        mods = blk._modules  # not blk.attn: nn.Module's __getattr__ costs a few hundred ns a name
        if type(blk) is not Block or _hooked(blk) or mods["attn"].num_heads != heads \
                or mods["norm1"].eps != eps or mods["norm2"].eps != eps:
            return None
        tensors = _one_op_tensors(blk, True)
        if tensors is None:
            return None
        params.append(tensors)
    return params, heads, eps


def run_blocks(blocks: Sequence[Block], x: torch.Tensor, outputs: Iterable[int] = (),
               qk_block: Optional[int] = None, **attention):
    """``x`` through ``blocks`` with each block's closing residual add done inside the next
    block's norm1 (``Block.forward(split=True)``): per block one pass over the stream less,
    forward and backward, than ``for blk in blocks: x = blk(x)``, and the same values.

    Returns (h, m, outs, qk): the last block's output is h + m, left to the caller (which can
    fuse it into its own next LayerNorm); ``outs[i]``, block i's output, for each i in
    ``outputs`` below the last block; qk as ``Block.forward(return_qk=True)`` gives it for
    block ``qk_block``. ``attention``: ``cu_seqlens`` / ``max_len`` / ``lengths`` (per image,
    on the host) of a packed sequence.

    A batched stack of plain blocks (``_one_op_stack``) is one ``ops.vit_blocks`` call: one
    autograd node for all of them, none of the per-block module calls."""
    if len(blocks) == 0:
        raise ValueError("run_blocks: blocks is empty (the output h + m needs at least one block)")
    outputs = set(outputs)
    stack = None if attention else _one_op_stack(blocks)
    if stack is not None:  # the whole stack as one ops.vit_blocks call
        params, heads, eps = stack
        wanted = sorted(i for i in outputs if 0 <= i < len(blocks) - 1)
        h, m, outs, qk = ops.vit_blocks(x, params, heads, eps, outputs=wanted, qk_block=qk_block)
        return h, m, dict(zip(wanted, outs)), qk
    outs, qk, pending = {}, None, None
    for i, blk in enumerate(blocks):
        x_in, x, pending, block_qk = blk(x, i == qk_block, pending=pending, split=True, **attention)
        if i - 1 in outputs:
            outs[i - 1] = x_in
        if i == qk_block:
            qk = block_qk
    return x, pending, outs, qk


def apply_norm(norm: nn.LayerNorm, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``norm(x)``, or ``norm(residual + x)``, through ``ops.layer_norm`` as in the blocks (the
    residual add fused in): the output keeps x's dtype, where ``nn.LayerNorm`` under autocast
    would write fp32 that the next Linear casts back down. The final norms of the TEC and MAE
    models; ``run_blocks``' (h, m) go in as ``apply_norm(norm, m, residual=h)``."""
    if residual is None:
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return ops.layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)[0]


def init_vit_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.proj.bias is not None:
                nn.init.zeros_(m.proj.bias)


def check_images(images: torch.Tensor, in_chans: int, img_size: int, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != in_chans or images.shape[2] != img_size \
            or images.shape[3] != img_size:
        raise ValueError(
            f"{name} must have shape [B, {in_chans}, {img_size}, {img_size}], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {images.dtype}")
