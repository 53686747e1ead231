"""``--decode gpu``: JPEGs decoded on the GPU in batches (nvjpeg through
``torchvision.io.decode_jpeg(..., device='cuda')``), RandomResizedCrop + flip + normalisation
there too. The loader workers only read each file, check its header and end marker, and draw the
crop box and the flip coin exactly as the CPU path does (same RNG calls, so the same boxes); what
crosses the process boundary is the encoded file (about 50-150 KB at ImageNet sizes, against 150 KB
for a decoded uint8 224x224 image).

Files that are not baseline JPEGs (PNG, CMYK JPEG, ...) take the CPU path in the worker and travel
decoded (uint8). A JPEG whose header or end marker is bad is skipped and counted in the worker, as
on the CPU path; one that nvjpeg still refuses is decoded on the CPU (PIL) with the same box; if
that fails too, the batch's first image stands in for it (with a warning), so the batch keeps its size.

Resampling here is bicubic with antialiasing on float pixels (not rounded to uint8 between the two
passes), and nvjpeg always decodes at full size: from the same decoded pixels the result is within
1.6 grey levels of the CPU path's (tested with a CPU stand-in for nvjpeg); nvjpeg's own IDCT and
the CPU path's DCT-scaled decodes of large crops add their differences.
Needs torchvision with CUDA; ``gpu_decode_reasons`` says why it is unavailable.
"""
from __future__ import annotations

import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch.utils.data import Dataset

from tec_fast.data.decode import EncodedImage
from tec_fast.data.transforms import draw_train_crop, normalize_stats, train_crop

_EOI = b"\xff\xd9"


def gpu_decode_reasons(device) -> List[str]:
    """Why ``--decode gpu`` cannot run on ``device`` (empty: it can)."""
    reasons = []
    device = torch.device(device)
    if device.type != "cuda":
        reasons.append(f"the training device is {device}, not a CUDA GPU")
    elif not torch.cuda.is_available():
        reasons.append("CUDA is not available to this torch build")
    try:
        import torchvision.io  # noqa: F401
        if not hasattr(torchvision.io, "decode_jpeg"):
            reasons.append(f"torchvision {torchvision.__version__} has no io.decode_jpeg")
    except Exception as exc:  # ImportError, or the RuntimeError of a torchvision built for another torch
        reasons.append(f"torchvision does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                       f"install the torchvision build that matches torch {torch.__version__}")
    return reasons


class EncodedSample(NamedTuple):
    """One training image as the worker sends it for GPU decode."""
    data: torch.Tensor                      # [N] uint8: the JPEG file
    box: Tuple[int, int, int, int]          # (left, top, w, h) in the file's pixels
    flip: bool
    name: str


class GpuDecodeView(Dataset):
    """``ds[i] -> (EncodedSample or uint8 [3, S, S], label)`` of an ``ImageDataset`` in train mode:
    JPEGs stay encoded (box and flip drawn here), other files are cropped on the CPU."""

    def __init__(self, dataset):
        if not getattr(dataset, "train", False) or getattr(dataset, "native_patch", None) is not None:
            raise ValueError("GpuDecodeView: the dataset must be in train mode at a fixed --img-size "
                             "(GPU decode does RandomResizedCrop batches, not native resolution)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.item(index, self._make)

    def _make(self, image: EncodedImage, index: int):
        if not (image.plain_jpeg):
            return train_crop(image, self.dataset.img_size)
        if not image.data.rstrip(b"\x00").endswith(_EOI):
            raise OSError("JPEG end marker missing (truncated file)")
        box, flip = draw_train_crop(image.width, image.height)
        data = torch.frombuffer(bytearray(image.data), dtype=torch.uint8)
        return EncodedSample(data, box, flip, getattr(image, "name", str(index)))


class EncodedBatch:
    """A batch of ``EncodedSample`` s and CPU-cropped uint8 images; ``to(device)`` decodes on the
    device and returns the normalised float images [B, 3, S, S]."""

    def __init__(self, items: list, size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self):
        self.items = [it._replace(data=it.data.pin_memory()) if isinstance(it, EncodedSample) else it.pin_memory()
                      for it in self.items]
        return self

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        encoded = [i for i, it in enumerate(self.items) if isinstance(it, EncodedSample)]
        decoded = _decode_on(device, [self.items[i].data for i in encoded], [self.items[i].name for i in encoded])
        out: List[Optional[torch.Tensor]] = [None] * len(self.items)
        for i, pixels in zip(encoded, decoded):
            if pixels is not None:
                it = self.items[i]
                out[i] = _resized_crop_float(pixels, it.box, self.size, it.flip)
        for i, it in enumerate(self.items):
            if not isinstance(it, EncodedSample):
                out[i] = it.to(device, non_blocking=non_blocking).float()
        good = next((x for x in out if x is not None), None)
        if good is None:
            raise RuntimeError("GPU decode: no image of the batch could be decoded")
        batch = torch.stack([x if x is not None else good for x in out])  # [B, 3, S, S] float in 0..255
        return _normalize_float(batch)


def collate_encoded(samples, size: int):
    """``[(EncodedSample | uint8 image, label), ...] -> (EncodedBatch, labels [B] int64)``."""
    return EncodedBatch([s[0] for s in samples], size), torch.tensor([int(s[1]) for s in samples])


class EncodedCollate:
    """``collate_fn`` for ``GpuDecodeView`` (a class, so spawned workers can pickle it)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, samples):
        return collate_encoded(samples, self.size)


def _decode_on(device: torch.device, files: List[torch.Tensor], names: List[str]) -> List[Optional[torch.Tensor]]:
    """[3, H, W] uint8 on ``device`` per file: one batched nvjpeg call; on failure one by one,
    then PIL on the CPU; None where nothing could decode it."""
    if not files:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        # nvjpeg writes its outputs from its own stream without waiting for this one, into memory the
        # caching allocator may just have freed under kernels still queued (the optimizer step's
        # gradients): wait for them first (torchcodec does the same before its batched decode)
        torch.cuda.current_stream(device).synchronize()
    try:
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, TypeError, ValueError):  # a file nvjpeg refuses, or a torchvision without batched decode
        pass
    out = []
    for data, name in zip(files, names):
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            continue
        except RuntimeError:
            pass
        try:
            arr = EncodedImage(bytes(data.cpu().numpy())).decode()
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).to(device))
        except Exception as exc:
            warnings.warn(f"GPU decode: {name} does not decode ({type(exc).__name__}: {exc}); another image "
                          f"of the batch stands in", RuntimeWarning)
            out.append(None)
    return out


def _resized_crop_float(pixels: torch.Tensor, box, size: int, flip: bool) -> torch.Tensor:
    left, top, w, h = box
    crop = pixels[None, :, top:top + h, left:left + w].float()
    if (w, h) != (size, size):
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    crop = crop[0].clamp_(0.0, 255.0)
    return crop.flip(-1) if flip else crop


def _normalize_float(batch: torch.Tensor) -> torch.Tensor:
    """``normalize`` for float pixels in 0..255 (the same mean / std)."""
    mean, std = normalize_stats(batch.device)
    return (batch.div_(255.0) - mean) / std


__all__ = ["EncodedBatch", "EncodedCollate", "EncodedSample", "GpuDecodeView", "collate_encoded",
           "gpu_decode_reasons"]


def gpu_decode_inputs(dataset):
    """(dataset, collate_fn) for ``fit`` with GPU decode: ``GpuDecodeView`` and ``EncodedCollate``."""
    return GpuDecodeView(dataset), EncodedCollate(dataset.img_size)
