"""Batches from the loader to the device.

Image batches travel as uint8 (a quarter of float32's bytes through the workers' shared memory,
the pinned staging buffer and the host -> device copy) and are normalised on the device, after
the copy (``transforms.normalize``: bitwise what normalising in the workers gave). The copy is
non-blocking; from pinned memory (the DataLoader's ``pin_memory``) it overlaps the host's work.

The rule: a 4-D uint8 tensor [B, 3, H, W] in a batch is images and gets normalised; float
tensors (the embedded demo's pre-normalised images, masking noise) and integer labels pass as
they are; objects with a ``to(device, non_blocking=...)`` method (``NativeBatch``, the GPU-decode
``EncodedBatch``) move themselves.
"""
from __future__ import annotations

import torch

from tec_fast.data.transforms import normalize


def is_uint8_images(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3


def to_device(batch, device: torch.device):
    """``batch`` (tensor, list, tuple, dict, or an object with ``to``) on ``device``; uint8 image
    batches normalised there."""
    if isinstance(batch, torch.Tensor):
        moved = batch.to(device, non_blocking=True)
        return normalize(moved) if is_uint8_images(batch) else moved
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if callable(getattr(batch, "to", None)):  # e.g. a NativeBatch
        return batch.to(device, non_blocking=True)
    return batch
