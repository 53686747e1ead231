"""Objectives ``fit`` trains with (the ``Objective`` protocol): TEC, TEC at native resolution,
MAE. They only route tensors to the model; the math is in ``TECModel`` and ``MAEModel``.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from tec_fast.models.base import BaseModel, BaseTargets
from tec_fast.models.masking import block_masking, variable_masking


@runtime_checkable
class Objective(Protocol):
    """What ``fit`` needs from an objective.

    ``noise_columns``: how many uniform masking-noise values per image ``fit`` draws for each
    micro-batch (seeded by (seed, step, micro) and split across processes, so masks do not
    depend on the process count or on resumes) and passes as ``noise`` [B, noise_columns];
    None when the objective draws its own (``noise`` is then None). Optional ``host_noise``: when
    True, ``noise`` stays on the host (the objective derives host-side facts from it, such as
    per-image visible counts, without reading the GPU back).
    ``__call__`` returns the loss under ``'loss'`` plus any other 0-dim metrics to log.
    Optional: ``for_precision(amp_dtype)`` -> the objective ``fit`` runs the steps with under
    that autocast dtype (None without autocast): a copy or ``self``, never a change to ``self``.
    """

    noise_columns: Optional[int]

    def __call__(self, model: nn.Module, batch, noise: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]: ...


def _check_ratio(mask_ratio) -> None:
    """A mask ratio in (0, 1): at 0 no patch is hidden and the loss averages over nothing (NaN);
    at 1 the encoder sees nothing."""
    ratios = mask_ratio if isinstance(mask_ratio, tuple) else (mask_ratio,)
    if isinstance(mask_ratio, bool) or not ratios or not all(isinstance(r, (int, float)) and 0 < r < 1 for r in ratios) \
            or (len(ratios) == 2 and ratios[0] > ratios[1]) or len(ratios) > 2:
        raise ValueError(f"mask_ratio must be in (0, 1) (or a (lo, hi) range in it), got {mask_ratio!r}")


def _with_autocast_base(objective, amp_dtype: Optional[torch.dtype]):
    """``objective``, or under bf16 / fp16 autocast a shallow copy of it whose frozen base is
    ``autocast_copy(base)``: its GEMM weights cast once instead of at every step, with the same
    values. ``objective`` itself is unchanged (its base stays usable outside autocast). No copy
    without autocast, when the targets come from a cache, or for a base that is not a
    ``BaseModel`` (a compiled base: ``torch.compile`` owns its casts)."""
    if amp_dtype is None or getattr(objective, "cache", None) is not None \
            or not isinstance(objective.base, BaseModel):
        return objective
    from tec_fast.training.precision import autocast_copy
    out = copy.copy(objective)
    out.base = autocast_copy(objective.base, amp_dtype)
    return out


class TECObjective:
    """TEC: the frozen base model's targets on the same batch, then the new model's loss.

    ``mask_ratio``: a float (every image keeps the same count: dense encoder) or a (lo, hi) range
    (a ratio per image, uniform in the range: packed encoder). ``masking='block'``: BEiT/iBOT
    block-wise masks of about ``mask_ratio`` (of a range: each image's ratio drawn uniformly
    from it, as for random masks) instead of random patches (packed encoder). For both variable
    modes the engine's masking noise gets one extra column per image, which draws that image's
    ratio or seeds its block mask, so masks stay reproducible across resumes and process counts.

    ``cache``: a ``TargetCache`` to look targets up by sample index instead of running the base
    model - valid only for data without random augmentation (the embedded demo), where the
    base's output per image never changes. Batches are then ``(images, index)``.
    """

    def __init__(self, base: BaseModel, mask_ratio, num_patches: int,
                 cache: Optional["TargetCache"] = None, masking: str = "random"):
        if masking not in ("random", "block"):
            raise ValueError(f"masking must be 'random' or 'block', got {masking!r}")
        _check_ratio(mask_ratio)
        self.base, self.mask_ratio, self.cache, self.masking = base, mask_ratio, cache, masking
        self.patches = num_patches
        self.variable = masking == "block" or isinstance(mask_ratio, tuple)
        self.noise_columns = num_patches + (1 if self.variable else 0)
        # variable masks are drawn on the host: visible counts known there, nothing read back
        self.host_noise = self.variable

    def for_precision(self, amp_dtype: Optional[torch.dtype]):
        """This objective, or a copy whose base runs as ``autocast_copy`` (``_with_autocast_base``)."""
        return _with_autocast_base(self, amp_dtype)

    def _ratios(self, u: torch.Tensor) -> torch.Tensor:
        lo, hi = self.mask_ratio if isinstance(self.mask_ratio, tuple) else (self.mask_ratio,) * 2
        return lo + (hi - lo) * u

    def __call__(self, model, batch, noise):
        images = batch[0]
        targets = self.cache.lookup(batch[1], images.device) if self.cache is not None else self.base(images)
        if not self.variable:
            return model(images, targets, mask_ratio=self.mask_ratio, noise=noise)
        B, L = images.shape[0], self.patches
        # The keep mask is made on the host (a device noise is read back once), so the model's
        # layout knows every image's visible count without waiting for the GPU.
        noise = torch.rand(B, L + 1) if noise is None else noise.cpu()
        ratios = self._ratios(noise[:, L])
        if self.masking == "random":
            keep, _ = variable_masking(B, L, ratios, noise=noise[:, :L])
        else:
            grid = int(round(L ** 0.5))
            keep = torch.cat([block_masking(1, grid, float(r), generator=torch.Generator().manual_seed(
                int(u * 2 ** 31))) for r, u in zip(ratios.tolist(), noise[:, L].tolist())])
        return model(images, targets, keep=keep)


class NativeTECObjective:
    """TEC at native resolution (``tec_fast.native``): images of different sizes, packed.

    Batches are ``(NativeBatch, [noise_b [L_b]])`` made by ``collate`` from the samples of
    ``samples(dataset)``, which draws each image's masking noise right after its augmentation,
    under the per-sample seed the engine sets (``SeededSamples``): masks are a function of
    (seed, epoch, image) only, so they do not change with resumes, worker or process counts.
    The loop's fixed-length noise is not used (``noise_columns = None``). The model must run
    the native loss in its forward (``NativeTECModel``) so DDP / FSDP2 see it. Metrics: loss,
    feature, relation, and ``fill`` = tokens in the batch / ``tokens_per_batch``.
    """

    noise_columns = None

    def __init__(self, base: BaseModel, mask_ratio: float, patch: int, tokens_per_batch: int):
        if not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool):
            raise ValueError(f"native resolution takes one mask ratio, got {mask_ratio!r}")
        _check_ratio(mask_ratio)
        self.base, self.mask_ratio = base, float(mask_ratio)
        self.patch, self.tokens_per_batch = int(patch), int(tokens_per_batch)
        self.collate = NativeNoiseCollate(self.patch)

    def for_precision(self, amp_dtype: Optional[torch.dtype]):
        """This objective, or a copy whose base runs as ``autocast_copy`` (``_with_autocast_base``)."""
        return _with_autocast_base(self, amp_dtype)

    def samples(self, dataset: Dataset) -> "NativeNoiseSamples":
        return NativeNoiseSamples(dataset, self.patch)

    def __call__(self, model, batch, noise):
        from tec_fast.models.native import native_base_targets
        native, per_image = batch
        targets = native_base_targets(self.base, native)
        out = model(native, targets, mask_ratio=self.mask_ratio, noise=per_image)
        # torch.full, not torch.tensor(value, device=...): that one copies from pageable memory and waits for the GPU
        out["fill"] = torch.full((), native.num_tokens / self.tokens_per_batch, device=out["loss"].device)
        return out


class NativeNoiseSamples(Dataset):
    """``ds[i] -> (image [C, H, W], noise [(H/patch) * (W/patch)])``: the wrapped dataset's
    image (H, W multiples of ``patch``; labels dropped) and uniform masking noise per patch,
    drawn from torch's RNG after the image (seeded per sample by the engine)."""

    def __init__(self, dataset: Dataset, patch: int):
        self.dataset, self.patch = dataset, patch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        L = (image.shape[-2] // self.patch) * (image.shape[-1] // self.patch)
        return image, torch.rand(L)


class HostTensors:
    """A sequence of tensors that stays on the host when a batch is moved to the device (``to``
    and ``pin_memory`` return it as it is): the per-image masking noise, from which the step
    derives its visible counts and index tensors without reading the GPU back."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def to(self, *args, **kwargs) -> "HostTensors":
        return self

    def pin_memory(self) -> "HostTensors":
        return self

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i):
        return self.tensors[i]

    def __iter__(self):
        return iter(self.tensors)


class NativeNoiseCollate:
    """``collate_fn``: ``[(image, noise), ...] -> (NativeBatch, HostTensors([noise, ...]))``."""

    def __init__(self, patch: int):
        self.patch = patch

    def __call__(self, samples):
        from tec_fast.models.native import NativeBatch
        return NativeBatch([s[0] for s in samples], self.patch), HostTensors(s[1] for s in samples)


class MAEObjective:
    """MAE base pretraining: masked patch-pixel reconstruction (``MAEModel``)."""

    def __init__(self, mask_ratio: float, num_patches: int):
        if isinstance(mask_ratio, tuple):
            raise ValueError("MAE takes one mask ratio, not a range")
        _check_ratio(mask_ratio)
        self.mask_ratio, self.noise_columns = mask_ratio, num_patches

    def __call__(self, model, batch, noise):
        return model(batch[0], mask_ratio=self.mask_ratio, noise=noise)


class IndexedDataset(Dataset):
    """``ds[i] -> (image, i)``: the sample index travels with the image (for ``TargetCache``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i][0], i


class TargetCache:
    """The base model's targets for every image of an un-augmented dataset, computed once
    (fp32 features, relation logits, top-k indices, kept on the CPU)."""

    def __init__(self, base: BaseModel, dataset: Dataset, batch_size: int = 256,
                 device: Optional[torch.device] = None):
        device = device or next(base.parameters()).device
        feats, rels, idxs = [], [], []
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for images, *_ in loader:
            t = base(images.to(device))
            feats.append(t.features.float().cpu())
            if t.relation is not None:
                rels.append(t.relation.float().cpu())
                idxs.append(t.topk_idx.cpu())
        self.features = torch.cat(feats)                       # [N, L, Cb]
        self.relation = torch.cat(rels) if rels else None      # [N, 1+k, Hb, L]
        self.topk_idx = torch.cat(idxs) if idxs else None      # [N, k]

    def lookup(self, index: torch.Tensor, device: torch.device) -> BaseTargets:
        index = index.cpu()
        pick = lambda t: None if t is None else t[index].to(device, non_blocking=True)  # noqa: E731
        return BaseTargets(pick(self.features), pick(self.relation), pick(self.topk_idx))
