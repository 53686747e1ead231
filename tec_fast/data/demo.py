"""The embedded demo data: scikit-learn's handwritten digits, upscaled to 32x32 and blended onto
crops of the photos scikit-learn ships, MNIST-M style. No download, tensor-backed, deterministic
given the seed (``demo_datasets`` / ``demo_arrays``)."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

DEMO_SIZE = 32
DEMO_CLASSES = tuple(str(i) for i in range(10))


class DemoArrays(NamedTuple):
    train_images: np.ndarray  # [N_train, 32, 32, 3] uint8
    train_labels: np.ndarray  # [N_train] int64
    test_images: np.ndarray   # [N_test, 32, 32, 3] uint8
    test_labels: np.ndarray   # [N_test] int64


class DemoDataset(Dataset):
    """Tensor-backed demo split: ``ds[i] -> (image [3, 32, 32] float32 normalised, label int)``.

    ``images`` holds the whole normalised split, ``labels`` the int64 labels; ``mean`` / ``std``
    are the per-channel statistics (of the *training* split, in [0, 1] pixel units) used for both
    splits.
    """

    classes = DEMO_CLASSES

    def __init__(self, images_uint8: np.ndarray, labels: np.ndarray,
                 mean: Sequence[float], std: Sequence[float]):
        x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.images = ((x - m) / s).contiguous()  # [N, 3, 32, 32]
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _upscale_digits(digits: np.ndarray, size: int) -> np.ndarray:
    """[N, 8, 8] in 0..16 -> [N, size, size] in [0, 1], bilinear (smooth strokes, not blocks)."""
    t = torch.from_numpy(digits.astype(np.float32) / 16.0).unsqueeze(1)
    up = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return up.squeeze(1).clamp_(0.0, 1.0).numpy()


def _photo_crops(photos: List[np.ndarray], n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n random crops of the photos, each of a random side in [size, 3*size] resized to
    size x size (so some crops are smooth sky, others dense texture), randomly flipped. uint8."""
    from PIL import Image

    out = np.empty((n, size, size, 3), dtype=np.uint8)
    which = rng.integers(0, len(photos), size=n)
    sides = rng.integers(size, 3 * size + 1, size=n)
    flips = rng.random(n) < 0.5
    for i in range(n):
        photo = photos[which[i]]
        H, W = photo.shape[:2]
        s = int(sides[i])
        top, left = int(rng.integers(0, H - s + 1)), int(rng.integers(0, W - s + 1))
        crop = photo[top:top + s, left:left + s]
        if s != size:
            crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


def _stratified_take(labels: np.ndarray, n: int) -> np.ndarray:
    """The first n indices of an already shuffled split, interleaved across classes so that any
    prefix is as class-balanced as possible (rank within class first, then class)."""
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    order = np.lexsort((labels, rank))
    return np.sort(order[:n])


def demo_arrays(seed: int = 0, n_train: Optional[int] = None,
                n_test: Optional[int] = None) -> DemoArrays:
    """The demo data as uint8 arrays, MNIST-M style: pixel = |photo crop - 255 * digit|.

    1797 digits (scikit-learn ``load_digits``), each on its own crop of the two photos of
    ``load_sample_images``; stratified ~80/20 train/test split. Everything (crops and split)
    is drawn from ``seed``. ``n_train`` / ``n_test`` take class-balanced subsets of the splits.
    """
    from sklearn.datasets import load_digits, load_sample_images
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    photos = [np.asarray(p, dtype=np.uint8) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    n = len(digits.target)
    strokes = _upscale_digits(digits.images, DEMO_SIZE)                 # [N, 32, 32] in [0, 1]
    crops = _photo_crops(photos, n, DEMO_SIZE, rng).astype(np.float32)  # [N, 32, 32, 3]
    images = np.abs(crops - 255.0 * strokes[..., None]).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)

    idx_train, idx_test = train_test_split(np.arange(n), test_size=0.2, random_state=seed,
                                           stratify=labels)
    for name, value, split in (("n_train", n_train, idx_train), ("n_test", n_test, idx_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= len(split)):
            raise ValueError(f"{name} must be None or an int in [1, {len(split)}], got {value!r}")
    if n_train is not None:
        idx_train = idx_train[_stratified_take(labels[idx_train], n_train)]
    if n_test is not None:
        idx_test = idx_test[_stratified_take(labels[idx_test], n_test)]
    return DemoArrays(images[idx_train], labels[idx_train], images[idx_test], labels[idx_test])


def demo_datasets(seed: int = 0, n_train: Optional[int] = None,
                  n_test: Optional[int] = None) -> Tuple[DemoDataset, DemoDataset]:
    """(train, test) ``DemoDataset``s of ``demo_arrays(seed, n_train, n_test)``, both normalised
    with the training split's per-channel mean and std."""
    a = demo_arrays(seed, n_train, n_test)
    px = a.train_images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = px.mean(axis=0), px.std(axis=0)
    return (DemoDataset(a.train_images, a.train_labels, mean, std),
            DemoDataset(a.test_images, a.test_labels, mean, std))
