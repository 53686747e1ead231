"""Modules built on the kernel ops: the encoder adapter (multi-layer fusion)."""
from __future__ import annotations

import torch
import torch.nn as nn

from tec_fast import ops
from tec_fast.config import check_positive_int
from tec_fast.models.layers import Mlp

# The reference implementation builds the adapter's two LayerNorms with nn.LayerNorm's default
# eps (1e-5), unlike the ViT blocks (1e-6); we keep that so its checkpoints give the same numbers.
ADAPTER_LN_EPS = 1e-5


class EncoderAdapter(nn.Module):
    """docs/tec.md §2 encoder adapter over the stacked encoder block outputs.

    Input ``feats`` [D, B, T, C] (block d's output at ``feats[d]``, the last one already through
    the encoder's final LayerNorm), output [B, T, C]:
    LN_{D*C} over the D*C channels, G groups of M = D/G blocks each projected M*C -> C, a residual
    MLP C -> hidden -> C per group, group sum, LN_C. Parameter names follow the official TEC
    checkpoints (``adap_before``, ``fuse_fcs.{g}``, ``adap_mlps.{g}.fc1/fc2``, ``adap_after``).
    """

    def __init__(self, dim: int, depth: int, num_groups: int, hidden: int):
        """``dim`` C, the encoder's width; ``depth`` D, the encoder blocks fused; ``num_groups``
        G, a divisor of D; ``hidden``, the width of each group's MLP. All positive ints."""
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("num_groups", num_groups), ("hidden", hidden)):
            check_positive_int(value, f"EncoderAdapter.{name}")
        if depth % num_groups:
            raise ValueError(f"EncoderAdapter: depth ({depth}) must be divisible by num_groups ({num_groups})")
        self.dim, self.depth, self.num_groups, self.hidden = dim, depth, num_groups, hidden
        m = depth // num_groups
        self.adap_before = nn.LayerNorm(dim * depth, eps=ADAPTER_LN_EPS)
        self.fuse_fcs = nn.ModuleList([nn.Linear(dim * m, dim) for _ in range(num_groups)])
        self.adap_mlps = nn.ModuleList([Mlp(dim, hidden) for _ in range(num_groups)])
        self.adap_after = nn.LayerNorm(dim, eps=ADAPTER_LN_EPS)

    def _weights(self):
        return (self.adap_before.weight, self.adap_before.bias,
                [f.weight for f in self.fuse_fcs], [f.bias for f in self.fuse_fcs],
                [m.fc1.weight for m in self.adap_mlps], [m.fc1.bias for m in self.adap_mlps],
                [m.fc2.weight for m in self.adap_mlps], [m.fc2.bias for m in self.adap_mlps],
                self.adap_after.weight, self.adap_after.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if not isinstance(feats, torch.Tensor) or feats.dim() != 4 \
                or feats.shape[0] != self.depth or feats.shape[3] != self.dim:
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else f"a {type(feats).__name__}"
            hint = " (stack the D block outputs: torch.stack(feats))" if isinstance(feats, (list, tuple)) else ""
            raise ValueError(f"EncoderAdapter: feats must be one tensor [D={self.depth}, B, T, C={self.dim}], "
                             f"got {got}{hint}")
        # tec_fast.ops.encoder_adapter validates the weights and picks the Triton kernels or the
        # plain-torch reference (see tec_fast.ops.dispatch)
        return ops.encoder_adapter(feats, *self._weights(), ADAPTER_LN_EPS, ADAPTER_LN_EPS)
