"""Images from a folder: ``root/<class>/**/*.jpg`` (or ``root/train/<class>/...``) or a flat
folder of images (label -1), decoded with PIL (every mode brought to 8-bit RGB, ``decode``) and
transformed with PIL + torch (RandomResizedCrop + flip for training, resize + center crop for
evaluation; or whole images on a patch grid for native resolution).

Unreadable images (truncated, corrupt, not an image at all): by default the item is replaced by
the next readable image in the listing (index ``i+1``, ``i+2``, ... wrapping around), so batches
keep their size (which DDP and compiled shapes need) and a warning naming the path is issued
once per process. Bad indices are recorded in a shared-memory tensor, so DataLoader workers and
the main process see the same ``num_skipped`` (distinct unreadable files met so far) and a known
bad file is not decoded again. ``strict=True`` raises ``UnreadableImage`` instead, with the path.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from tec_fast.data.decode import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class UnreadableImage(RuntimeError):
    """An image file PIL cannot decode (raised under ``strict=True``; the message names the path)."""


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _list_images(folder: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_file(f))
    return found


def find_samples(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples [(path, label)], classes). Class folders (images anywhere below them) if any
    subfolder holds images; otherwise the images directly in ``root``, label -1."""
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    per_class = [(c, files) for c in subdirs for files in [_list_images(os.path.join(root, c))] if files]
    if per_class:
        samples = [(p, label) for label, (_, files) in enumerate(per_class) for p in files]
        return samples, [c for c, _ in per_class]
    flat = sorted(e.path for e in os.scandir(root) if e.is_file() and _is_image_file(e.name))
    return [(p, -1) for p in flat], []


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


class ImageFolderDataset(Dataset):
    """Images from a folder: ``ds[i] -> (image [3, img_size, img_size] float32, label int)``.

    ``root`` may be the dataset root holding ``train/`` (used when it exists), a folder of class
    folders, or a flat folder of images (label -1, ``classes == []``). Normalised with the
    ImageNet mean/std.
    - ``train=True``: RandomResizedCrop(img_size, scale (0.2, 1), ratio (3/4, 4/3), bicubic) +
      horizontal flip with p = 0.5 (the TEC / MAE recipe), drawn from torch's RNG.
    - ``train=False``: resize the shorter side to int(img_size / 0.875) (bicubic), center crop.
    - ``native_patch=p`` (native resolution, NaViT-style): ``ds[i] -> (image [3, h*p, w*p], label)``,
      the whole image resized (bicubic) to the patch grid (h, w) = ``native_grid(H, W)``: aspect
      ratio kept, h*w <= ``max_patches``, never enlarged unless it would have fewer than
      ``min_patches`` patches (then enlarged to the budget); plus the horizontal flip when
      ``train``. ``native_grids()`` reads every image's header once to plan batches; after that
      a replacement for an unreadable image is resized to the grid planned for the index asked for.
    Unreadable files: see the module docstring (skip + count, or raise under ``strict``).
    """

    def __init__(self, root: str, img_size: int = 224, train: bool = True, strict: bool = False,
                 native_patch: Optional[int] = None, max_patches: Optional[int] = None,
                 min_patches: int = 1):
        if not os.path.isdir(root):
            raise ValueError(f"ImageFolderDataset: root {root!r} is not a directory")
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
            raise ValueError(f"ImageFolderDataset: img_size must be a positive int, got {img_size!r}")
        if os.path.isdir(os.path.join(root, "train")):
            root = os.path.join(root, "train")
        self.root, self.img_size, self.train, self.strict = root, img_size, bool(train), bool(strict)
        self.samples, self.classes = find_samples(root)
        if not self.samples:
            raise ValueError(f"ImageFolderDataset: no images ({', '.join(IMG_EXTENSIONS)}) found in "
                             f"{root!r} (neither in class subfolders nor directly inside)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self.resize_to = int(img_size / 0.875)
        # 1 = known unreadable. Shared memory, so counts made in DataLoader workers are visible here.
        self._bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        self._warned = set()  # per process: warn once per path
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.native_patch, self.max_patches, self.min_patches = native_patch, max_patches, min_patches
        self._grids: Optional[List[Tuple[int, int]]] = None
        if native_patch is not None:
            for name, v in (("native_patch", native_patch), ("max_patches", max_patches),
                            ("min_patches", min_patches)):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"ImageFolderDataset: {name} must be a positive int, got {v!r}")
            if min_patches > max_patches:
                raise ValueError(f"ImageFolderDataset: min_patches {min_patches} > max_patches {max_patches}")

    # ---- native resolution
    def native_grid(self, height: int, width: int) -> Tuple[int, int]:
        """The (rows, cols) patch grid an image of ``height`` x ``width`` pixels gets."""
        from tec_fast.models.native import budget_grid

        p, m = self.native_patch, self.max_patches
        h, w = budget_grid(height, width, p, m)
        if h * w < self.min_patches:
            h, w = budget_grid(height, width, p, m, upscale=True)
            if h * w < self.min_patches:  # extreme aspect ratio: a square-ish grid instead
                h, w = budget_grid(1, 1, p, m, upscale=True)
        return h, w

    def native_grids(self, threads: int = 8) -> List[Tuple[int, int]]:
        """Every image's patch grid (``native_grid`` of its size, from the file header; computed
        once). An unreadable header plans the square ``img_size`` grid (``strict``: raises)."""
        if self.native_patch is None:
            raise ValueError("ImageFolderDataset.native_grids: the dataset is not in native mode "
                             "(native_patch=None)")
        if self._grids is None:
            from concurrent.futures import ThreadPoolExecutor

            def size(i):
                from PIL import Image
                try:
                    with Image.open(self.samples[i][0]) as img:
                        return img.height, img.width
                except Exception as exc:
                    if self.strict:
                        raise UnreadableImage(f"unreadable image {self.samples[i][0]}: "
                                           f"{type(exc).__name__}: {exc}") from exc
                    return self.img_size, self.img_size  # replaced by a readable one when loaded

            with ThreadPoolExecutor(max(1, threads)) as pool:
                sizes = list(pool.map(size, range(len(self.samples)), chunksize=256))
            self._grids = [self.native_grid(h, w) for h, w in sizes]
        return self._grids

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable images met so far (in this process and its DataLoader workers)."""
        return int(self._bad.sum())

    def skipped_paths(self) -> List[str]:
        return [self.samples[i][0] for i in torch.nonzero(self._bad).flatten().tolist()]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                continue
            path, label = self.samples[i]
            try:
                img = self._load(path)
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
                if self.strict:
                    raise UnreadableImage(f"unreadable image {path}: {type(exc).__name__}: {exc}") from exc
                self._bad[i] = 1
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc}); "
                                  f"using the next readable one instead", RuntimeWarning)
                continue
            if self.native_patch is not None:
                return self._transform_native(img, index), label
            return self._transform(img), label
        raise UnreadableImage(f"ImageFolderDataset: none of the {n} images under {self.root!r} is readable")

    def _load(self, path: str):
        from PIL import Image

        with open(path, "rb") as f:
            img = Image.open(f)
            if not self.train:
                img.draft("RGB", (self.resize_to, self.resize_to))  # JPEG: decode at reduced scale
            return to_rgb(img)  # decodes fully inside the try, so a truncated file raises here

    def _transform_native(self, img, index: int) -> torch.Tensor:
        from PIL import Image

        p = self.native_patch
        h, w = self._grids[index] if self._grids is not None else self.native_grid(img.height, img.width)
        if (img.width, img.height) != (w * p, h * p):
            img = img.resize((w * p, h * p), Image.BICUBIC)
        if self.train and torch.rand(()) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std

    def _transform(self, img) -> torch.Tensor:
        from PIL import Image

        S = self.img_size
        if self.train:
            left, top, w, h = random_resized_crop_box(img.width, img.height)
            img = img.resize((S, S), Image.BICUBIC, box=(left, top, left + w, top + h))
            if torch.rand(()) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = min(img.width, img.height)
            w = max(S, round(img.width * self.resize_to / short))
            h = max(S, round(img.height * self.resize_to / short))
            img = img.resize((w, h), Image.BICUBIC)
            left, top = int(round((w - S) / 2.0)), int(round((h - S) / 2.0))
            img = img.crop((left, top, left + S, top + S))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std
