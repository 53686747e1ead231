"""The one table of kernel ops. Dispatch, ``python -m tec_fast.info``, ``benchmarks/bench_ops.py``,
``benchmarks/host_overhead.py``, ``benchmarks/compile_report.py`` and the GPU tests iterate it.

Adding an op means: a kernel file in ``kernels/`` (its Triton kernels, launchers, the
``autograd.Function`` and ``not_supported_reasons``), a function of the same name in
``reference.py``, the public wrapper in ``tec_fast/ops/__init__.py``, one row here, and a test.
A row names the kernel module, the ViT-B/16 shape the info report asks about, an ``example``:
inputs of a given size (``SIZES``) laid out as the model passes them, which the benchmarks time
and the GPU tests check against the reference, and optionally the ``work`` one call must at least
do (bytes moved or FLOPs), which ``bench_ops.py`` turns into GB/s or TFLOP/s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

# ViT-S/B/L at 224 and ViT-H/14 at 224 (patch grid 16 x 16), mask 0.75, the batch each trains at on
# one GPU (the benchmarks time vitb; the compile gate compiles all four); a few hundred elements
# (CPU runs, host-cost runs)
SIZES: Dict[str, Dict[str, int]] = {
    "vits": dict(B=256, L=196, K=49, C=384, Cd=512, H=6, d=64, topk=15, D=12, G=4, hidden=2048),
    "vitb": dict(B=256, L=196, K=49, C=768, Cd=512, H=12, d=64, topk=15, D=12, G=4, hidden=2048),
    "vitl": dict(B=128, L=196, K=49, C=1024, Cd=512, H=16, d=64, topk=15, D=24, G=8, hidden=2048),
    "vith": dict(B=64, L=256, K=64, C=1280, Cd=512, H=16, d=80, topk=15, D=32, G=4, hidden=2048),
    "tiny": dict(B=2, L=16, K=4, C=32, Cd=16, H=2, d=16, topk=3, D=6, G=2, hidden=32),
}


class Example(NamedTuple):
    """Arguments of one call of the public op (and of its reference, which takes the same ones),
    the tensors that get gradients (``grad_of``, leaves among the arguments; empty: no backward)
    and a label of the size."""
    args: tuple
    kwargs: dict
    grad_of: List[torch.Tensor]
    shape: str


@dataclass(frozen=True)
class OpSpec:
    name: str                    # public op ``tec_fast.ops.<name>`` and reference ``reference.<name>``
    kernel: str                  # module in ``tec_fast.kernels`` whose ``<name>`` is the Triton path
    report_shape: Tuple[int, ...]  # ViT-B/16 (B=256, mask 0.75) shape of the first argument
    example: Callable[[Dict[str, int], torch.dtype, torch.device], Example]
    report_info: Dict[str, int] = field(default_factory=dict)  # sizes the first argument does not show
    # (example, backward) -> {"bytes": ..., "flops": ...}: the least a call moves / computes
    work: Optional[Callable[[Example, bool], Dict[str, float]]] = None
    differentiable: bool = True  # False: no backward (its forward measurement decides in grad mode too)
    # when its kernels last changed in a way that makes older device measurements of it stale
    # (ISO time; ``benchmarks/dispatch_table.py`` leaves older rows out of the measured tables)
    kernels_changed: Optional[str] = None

    def info(self, ex: Example) -> Dict[str, object]:
        """The op-specific sizes dispatch needs for ``ex`` (as the public op passes them)."""
        return _INFO.get(self.name, lambda ex: {})(ex)


def _randn(*shape, dtype, device, grad=False, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(grad)


def _masked_gather(s, dtype, dev) -> Example:
    B, L, K, C = s["B"], s["L"], s["K"], s["C"]
    x, pos = _randn(B, L, C, dtype=dtype, device=dev, grad=True), _randn(L, C, dtype=dtype, device=dev, grad=True)
    ids = torch.rand(B, L, device=dev).argsort(1)[:, :K]
    return Example((x, ids, pos), {}, [x, pos], f"B={B},L={L},K={K},C={C}")


def _scatter_masked(s, dtype, dev) -> Example:
    B, L, K, C = s["B"], s["L"], s["K"], s["Cd"]
    vis = _randn(B, K, C, dtype=dtype, device=dev, grad=True)
    tok, pos = _randn(C, dtype=dtype, device=dev, grad=True), _randn(L, C, dtype=dtype, device=dev, grad=True)
    ids_restore = torch.rand(B, L, device=dev).argsort(1).argsort(1)
    return Example((vis, ids_restore, tok, pos), {}, [vis, tok, pos], f"B={B},L={L},K={K},C={C}")


def _patch_norm_mse(s, dtype, dev) -> Example:
    B, L, C = s["B"], s["L"], s["C"]
    pred, target = _randn(B, L, C, dtype=dtype, device=dev, grad=True), _randn(B, L, C, dtype=dtype, device=dev)
    mask = (torch.rand(B, L, device=dev) < 0.75).float()
    return Example((pred, target, mask), {}, [pred], f"B={B},L={L},C={C}")


def _relation_targets(s, dtype, dev) -> Example:
    B, H, N, d, topk = s["B"], s["H"], s["L"] + 1, s["d"], s["topk"]
    q, k = _randn(B, H, N, d, dtype=dtype, device=dev), _randn(B, H, N, d, dtype=dtype, device=dev)
    return Example((q, k, topk, d ** -0.5), {}, [], f"B={B},H={H},N={N},d={d},k={topk}")


def _relation_loss(s, dtype, dev) -> Example:
    B, H, N, d, topk = s["B"], s["H"], s["L"] + 1, s["d"], s["topk"]
    q, k = (_randn(B, H, N, d, dtype=dtype, device=dev, grad=True) for _ in range(2))
    idx = torch.rand(B, N - 1, device=dev).topk(topk, dim=1).indices
    target = _randn(B, 1 + topk, H, N - 1, dtype=torch.float32, device=dev)
    return Example((q, k, idx, target, 1.8, d ** -0.5), {}, [q, k], f"B={B},H={H},N={N},d={d},k={topk}")


def _encoder_adapter(s, dtype, dev) -> Example:
    """As ``tec_fast.models.adapter.EncoderAdapter`` passes them: group weights as lists."""
    D, G, B, T, C, hidden = s["D"], s["G"], s["B"], s["K"] + 1, s["C"], s["hidden"]
    M = D // G
    p = lambda *shape, scale=0.02: _randn(*shape, dtype=dtype, device=dev, grad=True, scale=scale)  # noqa: E731
    feats = p(D, B, T, C, scale=1.0)
    ln_bw, ln_bb, ln_aw, ln_ab = p(D * C, scale=1.0), p(D * C), p(C, scale=1.0), p(C)
    groups = [[p(C, M * C) for _ in range(G)], [p(C) for _ in range(G)], [p(hidden, C) for _ in range(G)],
              [p(hidden) for _ in range(G)], [p(C, hidden) for _ in range(G)], [p(C) for _ in range(G)]]
    leaves = [feats, ln_bw, ln_bb] + [t for g in groups for t in g] + [ln_aw, ln_ab]
    return Example((feats, ln_bw, ln_bb, *groups, ln_aw, ln_ab, 1e-5, 1e-5), {}, leaves,
                   f"D={D},G={G},B={B},T={T},C={C},hidden={hidden}")


def _layer_norm(s, dtype, dev) -> Example:
    """A block's norm2 with the attention branch's residual add: h = x + branch, y = LN(h)."""
    B, T, C = s["B"], s["K"] + 1, s["C"]
    x, res = _randn(B, T, C, dtype=dtype, device=dev, grad=True), _randn(B, T, C, dtype=dtype, device=dev, grad=True)
    w, b = _randn(C, dtype=dtype, device=dev, grad=True), _randn(C, dtype=dtype, device=dev, grad=True)
    return Example((x, w, b, 1e-6), {"residual": res}, [x, res, w, b], f"B={B},T={T},C={C}")


def _mlp(s, dtype, dev) -> Example:
    """An encoder block's MLP (C -> 4C -> C over the visible tokens)."""
    B, T, C = s["B"], s["K"] + 1, s["C"]
    hidden = 4 * C
    x = _randn(B, T, C, dtype=dtype, device=dev, grad=True)
    w1, b1 = _randn(hidden, C, dtype=dtype, device=dev, grad=True, scale=C ** -0.5), \
        _randn(hidden, dtype=dtype, device=dev, grad=True)
    w2, b2 = _randn(C, hidden, dtype=dtype, device=dev, grad=True, scale=hidden ** -0.5), \
        _randn(C, dtype=dtype, device=dev, grad=True)
    return Example((x, w1, b1, w2, b2), {}, [x, w1, b1, w2, b2], f"B={B},T={T},C={C},hidden={hidden}")


def _qkv_heads(s, dtype, dev) -> Example:
    """An encoder block's q/k/v projection into heads (visible tokens)."""
    B, N, C, H = s["B"], s["K"] + 1, s["C"], s["H"]
    x = _randn(B, N, C, dtype=dtype, device=dev, grad=True)
    w = _randn(3 * C, C, dtype=dtype, device=dev, grad=True, scale=C ** -0.5)
    b = _randn(3 * C, dtype=dtype, device=dev, grad=True)
    return Example((x, w, b, H), {}, [x, w, b], f"B={B},N={N},C={C},H={H}")


def _patch_embed(s, dtype, dev) -> Example:
    """The new model's patch embedding: images without a gradient, weight and bias with one."""
    B, p, D = s["B"], 16, s["C"]
    S = p * int(round(s["L"] ** 0.5))
    images = _randn(B, 3, S, S, dtype=dtype, device=dev)
    w, b = _randn(D, 3, p, p, dtype=dtype, device=dev, grad=True, scale=0.02), \
        _randn(D, dtype=dtype, device=dev, grad=True)
    return Example((images, w, b), {}, [w, b], f"B={B},S={S},p={p},D={D}")


# ---- the least work of one call (forward, or forward + backward) -----------------------------

def _esize(t: torch.Tensor) -> int:
    return t.element_size()


def _vit_block(s, dtype, dev) -> Example:
    """An encoder block over the visible tokens, with the previous block's MLP branch pending."""
    B, N, C, H = s["B"], s["K"] + 1, s["C"], s["H"]
    hidden = 4 * C
    r = lambda *shape, scale=1.0: _randn(*shape, dtype=dtype, device=dev, grad=True, scale=scale)  # noqa: E731
    x, pending = r(B, N, C), r(B, N, C)
    params = (r(C, scale=0.5) + 1, r(C), r(3 * C, C, scale=C ** -0.5), r(3 * C), r(C, C, scale=C ** -0.5), r(C),
              r(C, scale=0.5) + 1, r(C), r(hidden, C, scale=C ** -0.5), r(hidden), r(C, hidden, scale=hidden ** -0.5),
              r(C))
    params = tuple(p.detach().requires_grad_() for p in params)
    return Example((x, *params, H, 1e-6), {"pending": pending}, [x, pending, *params],
                   f"B={B},N={N},C={C},H={H},hidden={hidden}")


def _masked_gather_work(ex: Example, backward: bool) -> Dict[str, float]:
    x, ids, pos = ex.args
    (B, L, C), K = x.shape, ids.shape[1]
    # forward: read the kept rows and pos, write the output; backward: read grad_out, write all
    # of grad_x (zeros for dropped rows) and grad_pos
    n = (B * K * C + B * L * C + L * C) if backward else (2 * B * K * C + L * C)
    return {"bytes": n * _esize(x)}


def _scatter_masked_work(ex: Example, backward: bool) -> Dict[str, float]:
    vis, ids = ex.args[:2]
    (B, K, C), L = vis.shape, ids.shape[1]
    n = (B * L * C + B * K * C + L * C + C) if backward else (B * K * C + B * L * C + L * C)
    return {"bytes": n * _esize(vis)}


def _patch_norm_mse_work(ex: Example, backward: bool) -> Dict[str, float]:
    pred = ex.args[0]
    # forward reads pred and target; backward reads both again and writes grad_pred
    return {"bytes": (5 if backward else 2) * pred.numel() * _esize(pred)}


def _relation_targets_work(ex: Example, backward: bool) -> Dict[str, float]:
    q, _, topk, _ = ex.args
    B, H, N, d = q.shape
    return {"flops": 2.0 * B * H * (N - 1) * d * (2 + topk)}  # ranking row + 1+k rows


def _relation_loss_work(ex: Example, backward: bool) -> Dict[str, float]:
    q, _, idx = ex.args[:3]
    B, H, N, d = q.shape
    rows = 2.0 * B * H * (1 + idx.shape[1]) * (N - 1) * d
    return {"flops": (3 if backward else 1) * rows}


def _encoder_adapter_work(ex: Example, backward: bool) -> Dict[str, float]:
    feats, fc1_w = ex.args[0], ex.args[5]
    D, B, T, C = feats.shape
    G, hidden = len(fc1_w), fc1_w[0].shape[0]
    fwd = 2.0 * B * T * G * ((D // G) * C * C + 2 * C * hidden)
    return {"flops": (3 if backward else 1) * fwd}


def _layer_norm_work(ex: Example, backward: bool) -> Dict[str, float]:
    x = ex.args[0]
    # forward: x, residual in; y, h out. backward: dy, dh, h in; dx out
    return {"bytes": (8 if backward else 4) * x.numel() * _esize(x)}


def _mlp_work(ex: Example, backward: bool) -> Dict[str, float]:
    x, w1 = ex.args[:2]
    fwd = 4.0 * (x.numel() // x.shape[-1]) * x.shape[-1] * w1.shape[0]
    return {"flops": (3 if backward else 1) * fwd}


def _qkv_heads_work(ex: Example, backward: bool) -> Dict[str, float]:
    x, w = ex.args[:2]
    fwd = 2.0 * x.shape[0] * x.shape[1] * x.shape[2] * w.shape[0]
    return {"flops": (3 if backward else 1) * fwd}


def _patch_embed_work(ex: Example, backward: bool) -> Dict[str, float]:
    images, w = ex.args[:2]
    B, _, H, W = images.shape
    D, C, p, _ = w.shape
    fwd = 2.0 * B * (H // p) * (W // p) * C * p * p * D
    return {"flops": (2 if backward else 1) * fwd}


def _vit_block_work(ex: Example, backward: bool) -> Dict[str, float]:
    x, w1 = ex.args[0], ex.args[9]
    B, N, C = x.shape
    # the four projections, then q k^T and p v over all heads
    fwd = 2.0 * B * N * C * (4 * C + 2 * w1.shape[0]) + 4.0 * B * N * N * C
    return {"flops": (3 if backward else 1) * fwd}


# the op-specific sizes dispatch takes (``report_info`` keys), read off an example's arguments
_INFO: Dict[str, Callable[[Example], Dict[str, object]]] = {
    "relation_targets": lambda ex: {"topk": ex.args[2]},
    "relation_loss": lambda ex: {"topk": ex.args[2].shape[1]},
    "qkv_heads": lambda ex: {"head_dim": ex.args[1].shape[0] // (3 * ex.args[3])},
    "layer_norm": lambda ex: {"residual_dtype": ex.kwargs["residual"].dtype} if "residual" in ex.kwargs else {},
}

OPS: Dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("masked_gather", "masked_gather", (256, 196, 768), _masked_gather, work=_masked_gather_work),
    OpSpec("scatter_masked", "scatter_masked", (256, 49, 512), _scatter_masked, work=_scatter_masked_work),
    OpSpec("patch_norm_mse", "patch_norm_mse", (256, 196, 768), _patch_norm_mse, work=_patch_norm_mse_work),
    OpSpec("relation_targets", "relation_targets", (256, 12, 197, 64), _relation_targets, {"topk": 15},
           work=_relation_targets_work, differentiable=False),
    OpSpec("relation_loss", "relation_loss", (256, 12, 197, 64), _relation_loss, {"topk": 15},
           work=_relation_loss_work),
    OpSpec("encoder_adapter", "encoder_adapter", (12, 256, 50, 768), _encoder_adapter, work=_encoder_adapter_work,
           kernels_changed="2026-12-07T07:41:50+00:00"),  # its GEMMs moved from torch onto vit_block's kernel
    OpSpec("layer_norm", "layer_norm", (256, 50, 768), _layer_norm, work=_layer_norm_work),
    OpSpec("mlp", "mlp", (256, 50, 768), _mlp, work=_mlp_work),
    OpSpec("qkv_heads", "qkv_heads", (256, 50, 768), _qkv_heads, {"head_dim": 64}, work=_qkv_heads_work),
    OpSpec("patch_embed", "patch_embed", (256, 3, 224, 224), _patch_embed, work=_patch_embed_work),
    OpSpec("vit_block", "vit_block", (256, 50, 768), _vit_block, work=_vit_block_work),
)}


def outputs(result) -> List[torch.Tensor]:
    """The differentiable tensors an op returned (one tensor, or a tuple such as (y, h) or q, k, v)."""
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def unit_grads(outs: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """A gradient of ones for each output (what the benchmarks feed backward)."""
    return [torch.ones_like(t) for t in outs]
