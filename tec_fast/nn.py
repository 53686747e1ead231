"""Modules to drop into other masked-image-modeling code: ``EncoderAdapter`` (TEC's multi-layer
encoder fusion, fused forward and backward over the [D, B, T, C] block-output buffer) and
``Block`` (a pre-norm ViT block whose residual adds are fused into its LayerNorms). Both run
through ``tec_fast.ops``, so they take the fused kernels where the dispatch allows."""
from tec_fast.models.adapter import EncoderAdapter
from tec_fast.models.layers import Block

__all__ = ["EncoderAdapter", "Block"]
