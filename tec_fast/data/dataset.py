"""What every image source shares (folders, tar shards, Hugging Face folders): decode, transform,
unreadable files skipped and counted, native-resolution grids.

A source lists its samples (``names``: a path or member name per sample, ``targets``, ``classes``)
and returns one sample's encoded bytes (``_read``); this class does the rest, so a JPEG in a tar
shard comes out bit-identical to the same file in a folder.

Unreadable images (truncated, corrupt, empty, not an image at all): by default the item is
replaced by the next readable image (index ``i+1``, ``i+2``, ... wrapping around), so batches keep
their size (which DDP and compiled shapes need) and a warning naming the file is issued once per
process. Bad indices are recorded in a shared-memory tensor, so DataLoader workers and the main
process see the same ``num_skipped`` (distinct unreadable files met so far) and a known bad file is
not decoded again. ``strict=True`` raises ``UnreadableImage`` instead, with the name.
``drop_unreadable=True`` (evaluation: a replacement would be scored twice, maybe under another
class) makes an unreadable item ``None`` instead, counted the same way; load such a dataset with
``collate_fn=collate_readable``, which leaves the ``None`` items out of the batch.
"""
from __future__ import annotations

import os
import stat
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, default_collate

from tec_fast.data.decode import EncodedImage
from tec_fast.data.transforms import eval_crop, native_resize, normalize, train_crop


class UnreadableImage(RuntimeError):
    """An image PIL cannot decode (raised under ``strict=True``; the message names the file)."""


def read_file(path: str) -> bytes:
    """The bytes of the regular file ``path``. Opened without blocking, so a named pipe or a
    device that carries an image's name raises (an unreadable image) instead of stopping the
    loader worker that opened it until someone writes to it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = "a named pipe" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
            raise OSError(f"{kind}, not an image file")  # the caller names the file
        return f.read()


def collate_readable(batch):
    """``default_collate`` of the items that are not ``None`` (the unreadable ones of a
    ``drop_unreadable`` dataset); ``None`` when the whole batch was unreadable."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


class ImageDataset(Dataset):
    """``ds[i] -> (image [3, img_size, img_size], label int)``; the base of every image source.

    - ``train=True``: RandomResizedCrop(img_size, scale (0.2, 1), ratio (3/4, 4/3), bicubic) +
      horizontal flip with p = 0.5 (the TEC / MAE recipe), drawn from torch's RNG
      (``transforms.train_crop``).
    - ``train=False``: resize the shorter side to int(img_size / 0.875) (bicubic), center crop.
    - ``uint8=True``: images come out as uint8 [3, S, S] (0-255), a quarter of the bytes, for the
      trainer to normalise on the device (``transforms.normalize``); False: float32, normalised
      with the ImageNet mean / std here.
    - ``native_patch=p`` (native resolution, NaViT-style): ``ds[i] -> (image [3, h*p, w*p], label)``,
      the whole image resized (bicubic) to the patch grid (h, w) = ``native_grid(H, W)``: aspect
      ratio kept, h*w <= ``max_patches``, never enlarged unless it would have fewer than
      ``min_patches`` patches (then enlarged to the budget); plus the horizontal flip when
      ``train``. ``native_grids()`` reads every image's header once to plan batches; after that
      a replacement for an unreadable image is resized to the grid planned for the index asked for.
    Unreadable files: see the module docstring (replaced + counted, raised under ``strict``, or
    ``None`` under ``drop_unreadable``).
    """

    names: List[str]
    targets: List[int]
    classes: List[str]
    root: str
    kind = "images"

    def __init__(self, img_size: int = 224, train: bool = True, strict: bool = False, uint8: bool = False,
                 native_patch: Optional[int] = None, max_patches: Optional[int] = None,
                 min_patches: int = 1, drop_unreadable: bool = False):
        who = type(self).__name__
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
            raise ValueError(f"{who}: img_size must be a positive int, got {img_size!r}")
        self.img_size, self.train, self.strict, self.uint8 = img_size, bool(train), bool(strict), bool(uint8)
        self.native_patch, self.max_patches, self.min_patches = native_patch, max_patches, min_patches
        self.drop_unreadable = bool(drop_unreadable)
        self._grids: Optional[List[Tuple[int, int]]] = None
        if native_patch is not None:
            for name, v in (("native_patch", native_patch), ("max_patches", max_patches),
                            ("min_patches", min_patches)):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"{who}: {name} must be a positive int, got {v!r}")
            if min_patches > max_patches:
                raise ValueError(f"{who}: min_patches {min_patches} > max_patches {max_patches}")

    def _init_samples(self, names: Sequence[str], targets: Sequence[int], classes: Sequence[str]) -> None:
        """Called by a source once it has listed its samples."""
        self.names, self.targets, self.classes = list(names), [int(t) for t in targets], list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        # 1 = known unreadable. Shared memory, so counts made in DataLoader workers are visible here.
        self._bad = torch.zeros(len(self.names), dtype=torch.uint8).share_memory_()
        self._warned = set()  # per process: warn once per file

    def _read(self, i: int) -> bytes:
        """The encoded bytes of sample ``i`` (a source's one job: folders, shards and HF folders
        each define it)."""
        raise NotImplementedError(f"{type(self).__name__} is not an image source: it defines no _read")

    def encoded(self, i: int) -> EncodedImage:
        """Sample ``i``'s file, header read (raises on an unreadable header)."""
        image = EncodedImage(self._read(i))
        image.name = self.names[i]
        return image

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
            raise ValueError(f"{type(self).__name__}.native_grids: the dataset is not in native mode "
                             "(native_patch=None)")
        if self._grids is None:
            from concurrent.futures import ThreadPoolExecutor

            def size(i):
                try:
                    w, h = self.encoded(i).size
                    return h, w
                except Exception as exc:
                    if self.strict:
                        raise UnreadableImage(f"unreadable image {self.names[i]}: "
                                              f"{type(exc).__name__}: {exc}") from exc
                    return self.img_size, self.img_size  # replaced by a readable one when loaded

            with ThreadPoolExecutor(max(1, threads)) as pool:
                sizes = list(pool.map(size, range(len(self.names)), chunksize=256))
            self._grids = [self.native_grid(h, w) for h, w in sizes]
        return self._grids

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable images met so far (in this process and its DataLoader workers)."""
        return int(self._bad.sum())

    def skipped_paths(self) -> List[str]:
        return [self.names[i] for i in torch.nonzero(self._bad).flatten().tolist()]

    def __getitem__(self, index: int):
        return self.item(index, self._transform)

    def item(self, index: int, make: Callable[[EncodedImage, int], object]):
        """``(make(image, index), label)`` for the first readable sample from ``index`` on: the
        skip-and-count rule for any transform (the GPU-decode view uses its own ``make``).
        Under ``drop_unreadable`` only ``index`` itself is tried: ``None`` when it is unreadable."""
        n = len(self.names)
        for step in range(1 if self.drop_unreadable else n):
            i = (index + step) % n
            if self._bad[i]:
                continue
            try:
                out = make(self.encoded(i), index)  # decodes fully inside the try: a truncated file raises here
            except Exception as exc:  # PIL / libjpeg raise OSError, SyntaxError, ValueError, ... on bad files
                if self.strict:
                    raise UnreadableImage(f"unreadable image {self.names[i]}: {type(exc).__name__}: {exc}") from exc
                self._bad[i] = 1
                if self.names[i] not in self._warned:
                    self._warned.add(self.names[i])
                    instead = "left out" if self.drop_unreadable else "using the next readable one instead"
                    warnings.warn(f"skipping unreadable image {self.names[i]} ({type(exc).__name__}: {exc}); "
                                  f"{instead}", RuntimeWarning)
                continue
            return out, self.targets[i]
        if self.drop_unreadable:
            return None
        raise UnreadableImage(f"{type(self).__name__}: none of the {n} images under {self.root!r} is readable")

    def _transform(self, image: EncodedImage, index: int) -> torch.Tensor:
        if self.native_patch is not None:
            grid = self._grids[index] if self._grids is not None else self.native_grid(image.height, image.width)
            x = native_resize(image, grid, self.native_patch, self.train)
        elif self.train:
            x = train_crop(image, self.img_size)
        else:
            x = eval_crop(image, self.img_size)
        return x if self.uint8 else normalize(x)
