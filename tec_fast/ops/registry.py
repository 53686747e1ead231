"""The one table of kernel ops. Dispatch, ``python -m tec_fast.info`` and ``benchmarks/bench_ops.py``
iterate it; adding an op means a kernel file in ``kernels/`` (its Triton path, its custom op and
its ``not_supported_reasons``), a function in ``reference.py`` and one row here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

from tec_fast.ops import reference


@dataclass(frozen=True)
class OpSpec:
    name: str
    reference: Callable          # the plain-torch definition (``tec_fast.ops.reference``)
    kernel: str                  # module in ``tec_fast.kernels`` with the Triton path of the same name
    report_shape: Tuple[int, ...]  # ViT-B/16 (B=256, mask 0.75) shape of the first argument
    report_info: Dict[str, int] = field(default_factory=dict)  # sizes the first argument does not show
    grads: str = ""              # what it differentiates, for the docs and the report


OPS: Dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("masked_gather", reference.masked_gather, "masked_gather", (256, 196, 768), grads="x, pos"),
    OpSpec("scatter_masked", reference.scatter_masked, "scatter_masked", (256, 49, 512),
           grads="vis, mask_token, pos"),
    OpSpec("patch_norm_mse", reference.patch_norm_mse, "patch_norm_mse", (256, 196, 768), grads="pred"),
    OpSpec("relation_targets", reference.relation_targets, "relation_targets", (256, 12, 197, 64),
           {"topk": 15}),
    OpSpec("relation_loss", reference.relation_loss, "relation_loss", (256, 12, 197, 64), {"topk": 15},
           grads="q, k"),
    OpSpec("encoder_adapter", reference.encoder_adapter, "encoder_adapter", (12, 256, 50, 768),
           grads="feats and every weight"),
    OpSpec("layer_norm", reference.layer_norm, "layer_norm", (256, 50, 768),
           grads="x, residual, weight, bias"),
    OpSpec("mlp", reference.mlp, "mlp", (256, 50, 768), grads="x, w1, b1, w2, b2"),
    OpSpec("qkv_heads", reference.qkv_heads, "qkv_heads", (256, 50, 768), {"head_dim": 64},
           grads="x, weight, bias"),
    OpSpec("patch_embed", reference.patch_embed, "patch_embed", (256, 3, 224, 224), grads="weight, bias"),
)}
