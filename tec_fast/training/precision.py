"""Mixed precision for the frozen base model: its GEMM weights stored once in the autocast dtype.

Under autocast every Linear / convolution casts its fp32 weight and bias to the autocast dtype
at each call, and the engine's fused ops (``ops.qkv_heads``, ``ops.mlp``, ``ops.patch_embed``)
do the same explicitly. For the model being trained that is the price of fp32 master weights.
For the frozen base it is pure waste: the same ~100 cast kernels (ViT-B: one per weight and bias
of every block, about 0.5 GB read and written) every step, for values that never change.
``autocast_copy`` gives the objective a copy of the base whose Linear and Conv2d parameters are
already in the autocast dtype. Run under that autocast, it computes bitwise what the fp32 base
computes: the casts it skips are exactly the ones autocast would have made, to the same dtype.
Its LayerNorms, tokens and position embeddings stay in their own dtype, as autocast keeps them.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

# The layers whose parameters every op that reads them under autocast casts to the autocast dtype
# (F.linear / conv by autocast's policy; the engine's fused ops explicitly).
MATMUL_LAYERS = (nn.Linear, nn.Conv2d)


def autocast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the frozen ``module`` with the weights and biases of its Linear and Conv2d
    layers in ``dtype`` (``torch.bfloat16`` or ``torch.float16``), for running under
    ``torch.autocast(..., dtype=dtype)`` only: outside autocast its layers would see inputs of
    another dtype than their weights. The copy is made without a second fp32 copy of those
    weights (it adds about half the module's fp32 size while the original is kept); ``module``
    itself is left as it was."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_copy: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"autocast_copy: the module must be frozen (its weights are cast once), but "
                         f"{len(trainable)} parameters require grad, e.g. {trainable[0]!r}")
    memo = {}
    for layer in module.modules():
        if isinstance(layer, MATMUL_LAYERS):
            for p in layer.parameters(recurse=False):
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(module, memo)
