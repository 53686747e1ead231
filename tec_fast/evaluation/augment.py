"""Augmentations of the evaluation protocols, on image tensors, written here because timm (where
MAE takes them from) imports torchvision, whose registry wheel does not load beside this torch.

- ``TrainTransform``: RandomResizedCrop (bicubic) + horizontal flip, then optionally RandAugment
  and random erasing, on one normalised image [3, H, W]; random numbers from torch's RNG, so
  ``fit``'s per-sample seeding makes them a function of (seed, epoch, index).
- ``RandAugment``: timm's ``rand-m9-mstd0.5-inc1`` policy (the "increasing" op set MAE fine-tunes
  with): ``num_ops`` ops drawn with replacement, each applied with probability 0.5 at magnitude
  ~ N(m, mstd) clipped to [0, 10]. All 15 of timm's ops are here; they work on float pixels in
  [0, 1] (so posterize/solarize/equalize quantise to 8 bits first) and geometric ops fill with the
  dataset mean and interpolate bilinearly (timm draws bilinear or bicubic at random).
- ``random_erase``: timm's RandomErasing, mode 'pixel', one box.
- ``MixupCutmix``: timm's ``Mixup`` in 'batch' mode: per batch, cutmix (with probability
  ``switch_prob`` when both are on) or mixup with lambda ~ Beta(alpha, alpha), the batch mixed with
  its reverse, label-smoothed soft targets.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from tec_fast.data.folder import random_resized_crop_box


def _rand() -> float:
    return float(torch.rand(()))


def _sign() -> float:
    return -1.0 if _rand() < 0.5 else 1.0


# ------------------------------------------------------------------------------- RandAugment
def _blend(base: torch.Tensor, img: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance: base + factor * (img - base), clipped to [0, 1]."""
    return (base + factor * (img - base)).clamp_(0.0, 1.0)


def _gray(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of [3, H, W], as [1, H, W]."""
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)


def _to_u8(img: torch.Tensor) -> torch.Tensor:
    return (img * 255.0).round().clamp(0, 255).long()


def _affine(img: torch.Tensor, theta: Sequence[Sequence[float]], fill: torch.Tensor) -> torch.Tensor:
    """Sample ``img`` at theta @ (x, y, 1) in normalised coordinates; outside: ``fill``."""
    t = torch.tensor(theta, dtype=img.dtype).unsqueeze(0)
    grid = F.affine_grid(t, [1, *img.shape], align_corners=False)
    out = F.grid_sample((img - fill).unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0]
    return (out + fill).clamp_(0.0, 1.0)


class RandAugment:
    OPS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
           "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 fill: Sequence[float] = (0.485, 0.456, 0.406), prob: float = 0.5):
        if num_ops < 0 or not 0 <= magnitude <= 10 or magnitude_std < 0 or not 0 <= prob <= 1:
            raise ValueError(f"RandAugment: num_ops >= 0, magnitude in [0, 10], magnitude_std >= 0 and prob "
                             f"in [0, 1], got {num_ops}, {magnitude}, {magnitude_std}, {prob}")
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.fill = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """img [3, H, W] in [0, 1] -> augmented [3, H, W] in [0, 1]."""
        for _ in range(self.num_ops):
            op = self.OPS[int(torch.randint(len(self.OPS), ()))]
            if _rand() >= self.prob:
                continue
            m = self.magnitude + (float(torch.randn(())) * self.magnitude_std if self.magnitude_std else 0.0)
            img = getattr(self, op)(img, min(10.0, max(0.0, m)) / 10.0)
        return img

    # each op: (img in [0, 1], level in [0, 1]) -> img; "increasing": a higher level is stronger
    @staticmethod
    def auto_contrast(img, level):
        lo = img.amin(dim=(1, 2), keepdim=True)
        hi = img.amax(dim=(1, 2), keepdim=True)
        span = hi - lo
        return torch.where(span > 0, (img - lo) / span.clamp_min(1e-12), img)

    @staticmethod
    def equalize(img, level):
        """Per channel, PIL's histogram equalisation of the 8-bit values."""
        q = _to_u8(img)
        out = torch.empty_like(img)
        for c in range(q.shape[0]):
            hist = torch.bincount(q[c].flatten(), minlength=256)
            nonzero = hist[hist > 0]
            step = int((hist.sum() - nonzero[-1]) // 255)
            if step == 0:
                out[c] = img[c]
                continue
            lut = ((torch.cumsum(hist, 0) - hist + step // 2) // step).clamp(0, 255)
            out[c] = lut[q[c]].float() / 255.0
        return out

    @staticmethod
    def invert(img, level):
        return 1.0 - img

    def rotate(self, img, level):
        a = math.radians(30.0 * level * _sign())
        return _affine(img, [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], self.fill)

    @staticmethod
    def posterize(img, level):
        bits = 4 - int(level * 4)
        mask = (0xFF << (8 - bits)) & 0xFF
        return (_to_u8(img) & mask).float() / 255.0

    @staticmethod
    def solarize(img, level):
        threshold = 256 - int(level * 256)
        q = _to_u8(img)
        return torch.where(q >= threshold, 255 - q, q).float() / 255.0

    @staticmethod
    def solarize_add(img, level):
        q = _to_u8(img)
        return torch.where(q < 128, (q + int(level * 110)).clamp(max=255), q).float() / 255.0

    @staticmethod
    def color(img, level):
        return _blend(_gray(img).expand_as(img), img, 1.0 + 0.9 * level * _sign())

    @staticmethod
    def contrast(img, level):
        return _blend(_gray(img).mean().expand_as(img), img, 1.0 + 0.9 * level * _sign())

    @staticmethod
    def brightness(img, level):
        return _blend(torch.zeros_like(img), img, 1.0 + 0.9 * level * _sign())

    @staticmethod
    def sharpness(img, level):
        """Blend with PIL's SMOOTH filter (3x3, centre 5, sum 13); the border keeps its pixels."""
        k = torch.ones(3, 1, 3, 3, dtype=img.dtype)
        k[:, :, 1, 1] = 5.0
        smooth = img.clone()
        smooth[:, 1:-1, 1:-1] = F.conv2d(img.unsqueeze(0), k / 13.0, groups=3)[0]
        return _blend(smooth, img, 1.0 + 0.9 * level * _sign())

    # timm's shears (PIL AFFINE (1, k, 0, 0, 1, 0) and (1, 0, 0, k, 1, 0)) keep the top-left
    # corner in place: x_in = x + k y in pixels, which in affine_grid's normalised coordinates is
    # x_in = x + k (H / W) (y + 1)
    def shear_x(self, img, level):
        k = 0.3 * level * _sign() * img.shape[-2] / img.shape[-1]
        return _affine(img, [[1.0, k, k], [0.0, 1.0, 0.0]], self.fill)

    def shear_y(self, img, level):
        k = 0.3 * level * _sign() * img.shape[-1] / img.shape[-2]
        return _affine(img, [[1.0, 0.0, 0.0], [k, 1.0, k]], self.fill)

    def translate_x(self, img, level):  # a fraction 0.45 * level of the width
        return _affine(img, [[1.0, 0.0, 2 * 0.45 * level * _sign()], [0.0, 1.0, 0.0]], self.fill)

    def translate_y(self, img, level):
        return _affine(img, [[1.0, 0.0, 0.0], [0.0, 1.0, 2 * 0.45 * level * _sign()]], self.fill)


# ---------------------------------------------------------------------------- per image
def random_erase(x: torch.Tensor, prob: float, area: Tuple[float, float] = (0.02, 1 / 3),
                 ratio: Tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """With probability ``prob``, one box of area fraction ~ U(area), log aspect ~ U(log ratio)
    replaced by N(0, 1) noise per pixel (the image is normalised). 10 tries to fit the box."""
    if prob <= 0 or _rand() >= prob:
        return x
    _, H, W = x.shape
    for _ in range(10):
        target = H * W * (area[0] + (area[1] - area[0]) * _rand())
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand())
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < h < H and 0 < w < W:
            top, left = int(torch.randint(0, H - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
            x = x.clone()
            x[:, top:top + h, left:left + w] = torch.randn(x.shape[0], h, w, dtype=x.dtype)
            return x
    return x


class TrainTransform:
    """A normalised image [3, H, W] -> the protocol's training view of it (same size)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_scale: Tuple[float, float] = (0.08, 1.0),
                 rand_augment: Optional[RandAugment] = None, reprob: float = 0.0):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.crop_scale, self.rand_augment, self.reprob = tuple(crop_scale), rand_augment, reprob

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W = x.shape
        left, top, w, h = random_resized_crop_box(W, H, scale=self.crop_scale)
        x = F.interpolate(x[None, :, top:top + h, left:left + w], size=(H, W), mode="bicubic",
                          align_corners=False)[0]
        if _rand() < 0.5:
            x = x.flip(-1)
        if self.rand_augment is not None:
            pixels = (x * self.std + self.mean).clamp_(0.0, 1.0)
            x = (self.rand_augment(pixels) - self.mean) / self.std
        return random_erase(x, self.reprob)


class Augmented(torch.utils.data.Dataset):
    """``(transform(image), label)`` for each ``(image, label)`` of ``dataset``."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return self.transform(image), label


# ------------------------------------------------------------------------------- per batch
class MixupCutmix:
    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1):
        if num_classes < 1 or mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= smoothing < 1 \
                or not 0 <= switch_prob <= 1:
            raise ValueError(f"MixupCutmix: num_classes >= 1, alphas >= 0, smoothing in [0, 1), switch_prob "
                             f"in [0, 1]; got {num_classes}, {mixup_alpha}, {cutmix_alpha}, {smoothing}, "
                             f"{switch_prob}")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.switch_prob, self.smoothing = switch_prob, smoothing

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def soft_targets(self, labels: torch.Tensor, lam: float, dtype=torch.float32) -> torch.Tensor:
        off = self.smoothing / self.num_classes
        one_hot = torch.full((len(labels), self.num_classes), off, device=labels.device, dtype=dtype)
        one_hot.scatter_(1, labels.view(-1, 1), 1.0 - self.smoothing + off)
        return one_hot * lam + one_hot.flip(0) * (1.0 - lam)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        """(mixed images, soft targets [B, classes]); ``rng`` draws this batch's choices."""
        lam = 1.0
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        if use_cutmix:
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            H, W = images.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(H * cut), int(W * cut)
            cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            images = images.clone()
            images[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
        elif self.mixup_alpha > 0:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            images = images * lam + images.flip(0) * (1.0 - lam)
        return images, self.soft_targets(labels, lam)
