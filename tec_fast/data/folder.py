"""Images from a folder: ``root/<class>/**/*.jpg`` (or ``root/train/<class>/...``) or a flat
folder of images (label -1). Decoding, transforms and the skip-and-count rule for unreadable
files are ``ImageDataset``'s (``tec_fast.data.dataset``), shared with tar shards and Hugging Face
folders.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Tuple

from tec_fast.data.dataset import ImageDataset, UnreadableImage, read_file
from tec_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_box

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMG_EXTENSIONS", "ImageFolderDataset", "UnreadableImage",
           "find_samples", "random_resized_crop_box"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
# image formats (PIL reads most) that are not read: counted and named, not lost without a word
OTHER_IMAGE_EXTENSIONS = (".gif", ".jfif", ".jpe", ".apng", ".avif", ".heic", ".heif", ".jp2", ".j2k", ".jpx",
                          ".pbm", ".pnm", ".dib", ".ico", ".tga", ".qoi", ".psd", ".pcx", ".sgi", ".ras")


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _is_other_image(name: str) -> bool:
    return name.lower().endswith(OTHER_IMAGE_EXTENSIONS) and not name.startswith(".")


def _list_images(folder: str, others: List[str]) -> List[str]:
    """The images below ``folder``, following links to folders but not into one already listed
    (a link to a folder above it would list its images again until the kernel's link limit);
    files of ``OTHER_IMAGE_EXTENSIONS`` are added to ``others``."""
    found = []
    st = os.stat(folder)
    seen = {(st.st_dev, st.st_ino)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=_unlisted):
        kept = []
        for d in sorted(dirnames):
            st = os.stat(os.path.join(dirpath, d))
            if (st.st_dev, st.st_ino) in seen:
                warnings.warn(f"{os.path.join(dirpath, d)} is a link to a folder already listed: its images "
                              f"are not listed again", RuntimeWarning)
            else:
                seen.add((st.st_dev, st.st_ino))
                kept.append(d)
        dirnames[:] = kept
        for f in sorted(filenames):
            if _is_image_file(f):
                found.append(os.path.join(dirpath, f))
            elif _is_other_image(f):
                others.append(os.path.join(dirpath, f))
    return found


def _unlisted(exc: OSError) -> None:
    """os.walk's error: a folder below a class folder that cannot be listed (no permission) is
    named, not skipped without a word."""
    warnings.warn(f"{exc.filename} cannot be listed ({exc.strerror or exc}): its images are not read",
                  RuntimeWarning)


def find_samples(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples [(path, label)], classes). Class folders (images anywhere below them) if any
    subfolder holds images; otherwise the images directly in ``root``, label -1. Warns with the
    count and the first name of the image files not read: those beside class folders, and those
    of an extension outside ``IMG_EXTENSIONS`` (a class folder holding only such files is no
    class: the labels of the classes after it shift)."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    others: List[str] = []
    per_class = [(e.name, files) for e in entries if e.is_dir() and not e.name.startswith(".")
                 for files in [_list_images(e.path, others)] if files]
    loose = [e.path for e in entries if e.is_file() and _is_image_file(e.name)]
    others.extend(e.path for e in entries if e.is_file() and _is_other_image(e.name))
    if others:
        warnings.warn(f"{len(others)} files under {root} have an image extension that is not read (first: "
                      f"{others[0]}); only {', '.join(IMG_EXTENSIONS)} are", RuntimeWarning)
    if per_class:
        if loose:
            warnings.warn(f"{len(loose)} images directly in {root} (first: {os.path.basename(loose[0])}) are not "
                          f"read: beside class folders, only the images inside those are", RuntimeWarning)
        samples = [(p, label) for label, (_, files) in enumerate(per_class) for p in files]
        return samples, [c for c, _ in per_class]
    return [(p, -1) for p in loose], []


def image_root(root: str) -> str:
    """Where a folder's images are read from: ``root/train`` where it exists, else ``root``."""
    train = os.path.join(root, "train")
    return train if os.path.isdir(train) else root


def holds_images(root: str) -> bool:
    """Whether ``find_samples(image_root(root))`` would find any image, stopping at the first one
    (a command refuses an empty folder up front without listing a full one). OSError where the
    folder cannot be read."""
    root = image_root(root)
    entries = list(os.scandir(root))
    if any(e.is_file() and _is_image_file(e.name) for e in entries):
        return True
    return any(_is_image_file(f) for e in entries if e.is_dir() and not e.name.startswith(".")
               for _, _, files in os.walk(e.path, followlinks=True) for f in files)


class ImageFolderDataset(ImageDataset):
    """Images from a folder: ``ds[i] -> (image [3, img_size, img_size], label int)``.

    ``root`` may be the dataset root holding ``train/`` (used when it exists), a folder of class
    folders, or a flat folder of images (label -1, ``classes == []``). ``samples``: the
    ``(path, label)`` list. Transforms, ``uint8``, native resolution and unreadable files
    (``strict``, ``drop_unreadable``): see ``ImageDataset``.
    """

    kind = "folder"

    def __init__(self, root: str, img_size: int = 224, train: bool = True, strict: bool = False,
                 native_patch: Optional[int] = None, max_patches: Optional[int] = None,
                 min_patches: int = 1, uint8: bool = False, drop_unreadable: bool = False):
        if not os.path.isdir(root):
            raise ValueError(f"ImageFolderDataset: root {root!r} is not a directory")
        super().__init__(img_size, train, strict, uint8, native_patch, max_patches, min_patches, drop_unreadable)
        root = image_root(root)
        self.root = root
        self.samples, classes = find_samples(root)
        if not self.samples:
            raise ValueError(f"ImageFolderDataset: no images ({', '.join(IMG_EXTENSIONS)}) found in "
                             f"{root!r} (neither in class subfolders nor directly inside)")
        self._init_samples([p for p, _ in self.samples], [label for _, label in self.samples], classes)
        self.resize_to = int(img_size / 0.875)

    def _read(self, i: int) -> bytes:
        return read_file(self.samples[i][0])
