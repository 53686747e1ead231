"""The image transforms of the datasets, on uint8 pixels.

Training (the TEC / MAE recipe): RandomResizedCrop(scale (0.2, 1), ratio (3/4, 4/3), bicubic) +
horizontal flip with p = 0.5. The crop box is drawn from the header's size before anything is
decoded, the file is decoded once, and the box is resampled by torch's uint8 bicubic kernel with
antialiasing (the same filter as PIL's BICUBIC: a = -0.5, support scaled with the reduction; about
6x faster than PIL's on one core here). One difference from ``PIL.Image.resize(box=...)``: PIL's
filter reads pixels just outside the box near its edges, this one clamps at the box's edge (the
crop is resampled alone, as if cropped first).

Evaluation: resize the shorter side to ``int(img_size / 0.875)`` (PIL bicubic), center crop; past
an aspect ratio of 4 only the crop's region is resampled (``PIL.Image.resize(box=...)``), so an
extreme aspect ratio costs no more memory than a square image.

``normalize`` turns uint8 images into the model's float input (ImageNet mean / std). The trainer
calls it on the device, after the copy: a uint8 image is a quarter of the float32 one that used to
cross the worker -> main process boundary and the host -> device copy.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_STATS = {}
# eval_crop resizes the whole image up to this aspect ratio, and only the crop's region past it
EVAL_WHOLE_RESIZE_RATIO = 4


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] (0-255) -> float32 ``(x / 255 - mean) / std`` with the
    ImageNet statistics, on the images' device (bitwise what normalising in the workers gave)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize: images must be uint8, got {images.dtype}")
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize: images must be [..., 3, H, W], got {tuple(images.shape)}")
    mean, std = normalize_stats(images.device)
    return (images.float().div_(255.0) - mean) / std


def normalize_stats(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet (mean, std) as [3, 1, 1] float32 tensors on ``device``, made once per device."""
    if device not in _STATS:
        _STATS[device] = (torch.tensor(IMAGENET_MEAN).view(3, 1, 1).to(device),
                          torch.tensor(IMAGENET_STD).view(3, 1, 1).to(device))
    return _STATS[device]


def random_resized_crop_box(width: int, height: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                            generator: Optional[torch.Generator] = None) -> Tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h): area fraction ~ U(scale), log aspect ratio
    ~ U(log ratio), 10 tries, then the central crop with the ratio clamped. Uses torch's RNG so
    DataLoader workers are seeded the usual way."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def draw_train_crop(width: int, height: int) -> Tuple[Tuple[int, int, int, int], bool]:
    """(box, flip) of one training sample, from torch's global RNG (seeded per sample by the
    trainer): the box first, then the flip coin, as the workers have always drawn them."""
    box = random_resized_crop_box(width, height)
    return box, bool(torch.rand(()) < 0.5)


def resized_crop(pixels: torch.Tensor, box: Tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 [3, H, W] (any strides) -> the ``box`` (left, top, w, h) resampled to [3, size, size]
    uint8 (bicubic, antialiased), contiguous."""
    left, top, w, h = box
    crop = pixels[None, :, top:top + h, left:left + w]
    if (w, h) != (size, size):
        # a dense channels-last crop takes torch's vectorised uint8 path (0.23 ms here at 335 -> 224
        # px, against 0.30 on the strided view of the decoded image and 0.51 on planar NCHW)
        crop = crop.contiguous(memory_format=torch.channels_last)
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    return crop[0].contiguous()


def scale_box(box: Tuple[int, int, int, int], fx: float, fy: float, width: int, height: int):
    """The box in an image decoded at (fx, fy) of the header's size, grown to whole pixels and
    clamped to the decoded ``width`` x ``height``."""
    left, top, w, h = box
    x0, y0 = int(math.floor(left * fx)), int(math.floor(top * fy))
    x1, y1 = min(width, int(math.ceil((left + w) * fx))), min(height, int(math.ceil((top + h) * fy)))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def train_crop(image, size: int) -> torch.Tensor:
    """One training sample from an ``EncodedImage``: RandomResizedCrop + flip, uint8 [3, size, size].
    A JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's draft mode) when the
    crop keeps at least ``size`` pixels per side there."""
    from tec_fast.data.decode import jpeg_reduction

    W, H = image.size
    box, flip = draw_train_crop(W, H)
    reduce = jpeg_reduction(W, H, size * W / box[2], size * H / box[3]) if image.is_jpeg else 1
    arr = image.decode(reduce)  # [H', W', 3]
    if arr.shape[:2] != (H, W):
        box = scale_box(box, 1.0 / reduce, 1.0 / reduce, arr.shape[1], arr.shape[0])
    pixels = torch.from_numpy(_writable(arr)).permute(2, 0, 1)  # [3, H', W'] (channels-last strides)
    out = resized_crop(pixels, box, size)
    return out.flip(-1) if flip else out


def eval_crop(image, size: int) -> torch.Tensor:
    """Resize the shorter side to ``int(size / 0.875)`` (PIL bicubic), center crop: uint8
    [3, size, size]. A JPEG is decoded at the reduced scale PIL's ``draft("RGB", (r, r))`` picks.

    Past an aspect ratio of ``EVAL_WHOLE_RESIZE_RATIO`` only the crop is resampled
    (``resize(box=...)``, the crop's region in the decoded image; the filter reads past the box
    as in the whole resize): resizing the whole image made a 4000 x 2 one 512 000 x 256 pixels
    at 224 (1.5 GB at 1 x 16 000). Its pixels are those of the whole resize to within a few grey
    levels (PIL rounds the box to float32 and may run the two passes in the other order); images
    up to that ratio keep the whole resize, bit for bit."""
    from PIL import Image

    from tec_fast.data.decode import jpeg_reduction

    resize_to = int(size / 0.875)
    reduce = jpeg_reduction(image.width, image.height, resize_to, resize_to) if image.is_jpeg else 1
    img = Image.fromarray(image.decode(reduce))
    W, H = img.width, img.height
    short = min(W, H)
    w = max(size, round(W * resize_to / short))
    h = max(size, round(H * resize_to / short))
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    if max(w, h) <= EVAL_WHOLE_RESIZE_RATIO * resize_to:
        img = img.resize((w, h), Image.BICUBIC)
        return to_chw(np.asarray(img.crop((left, top, left + size, top + size))))
    # the crop (left, top, size, size) of the w x h resize, in the decoded image's coordinates
    box = (left * W / w, top * H / h, (left + size) * W / w, (top + size) * H / h)
    return to_chw(np.asarray(img.resize((size, size), Image.BICUBIC, box=box)))


def native_resize(image, grid_hw: Tuple[int, int], patch: int, flip_coin: bool) -> torch.Tensor:
    """The whole image resized (PIL bicubic) to the patch grid (h, w): uint8 [3, h*patch, w*patch];
    plus the horizontal flip with p = 0.5 when ``flip_coin``."""
    from PIL import Image

    h, w = grid_hw
    img = Image.fromarray(image.decode())
    if (img.width, img.height) != (w * patch, h * patch):
        img = img.resize((w * patch, h * patch), Image.BICUBIC)
    if flip_coin and torch.rand(()) < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_chw(np.asarray(img))


def to_chw(arr: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 array -> contiguous [3, H, W] uint8 tensor (a copy)."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _writable(arr: np.ndarray) -> np.ndarray:
    # torch.from_numpy warns on read-only arrays (PIL's); nothing writes through the view
    return arr if arr.flags.writeable else arr.copy()
