"""The demo data (determinism, shapes, balance) and image folders (transforms, bad files)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tec_fast.data.decode import to_rgb
from tec_fast.data.images import (IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, UnreadableImage,
                                  demo_arrays, demo_datasets, random_resized_crop_box)


@pytest.fixture(scope="module")
def demo():
    return demo_datasets(seed=0)


def test_demo_shapes_and_normalisation(demo):
    train, test = demo
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.2) < 0.01
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert train.images.shape == (len(train), 3, 32, 32)
    # normalised with the training split's statistics
    assert torch.allclose(train.images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(train.images.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert test.mean == train.mean and test.std == train.std


def test_demo_labels_balanced(demo):
    for ds in demo:
        counts = torch.bincount(ds.labels, minlength=10)
        assert len(counts) == 10 and counts.min() >= 0.9 * counts.max()


def test_demo_deterministic_and_seeded(demo):
    a, b = demo_arrays(0), demo_arrays(0)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    train, _ = demo
    np.testing.assert_array_equal(train.labels.numpy(), a.train_labels)
    c = demo_arrays(1)
    assert not np.array_equal(a.train_images[:50], c.train_images[:50])
    assert a.train_images.dtype == np.uint8 and a.train_images.shape[1:] == (32, 32, 3)


def test_demo_subsets_balanced_and_disjoint():
    a = demo_arrays(0, n_train=100, n_test=30)
    assert len(a.train_labels) == 100 and len(a.test_labels) == 30
    assert np.bincount(a.train_labels).tolist() == [10] * 10
    assert np.bincount(a.test_labels).tolist() == [3] * 10
    full = demo_arrays(0)
    # a subset is drawn from its own split: no test image leaks into train
    train_set = {img.tobytes() for img in full.train_images}
    assert not any(img.tobytes() in train_set for img in a.test_images)
    with pytest.raises(ValueError, match="n_train"):
        demo_arrays(0, n_train=0)


def test_demo_digits_are_visible():
    """The digit must change the image: pixel k-NN well above chance on a small subset."""
    from tec_fast.evaluation.probe import knn_accuracy
    a = demo_arrays(0, n_train=400, n_test=100)
    f = lambda im: im.reshape(len(im), -1).astype(np.float32) - 128  # noqa: E731
    assert knn_accuracy(f(a.train_images), a.train_labels, f(a.test_images), a.test_labels) > 0.4


# ---------------------------------------------------------------------------- image folders
def _write_images(folder, n, size=(40, 30), fmt="JPEG", seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        p = folder / f"img{i}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        Image.fromarray(arr).save(p, format=fmt)
        paths.append(p)
    return paths


def _truncated_jpeg(path):
    arr = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_folder_classes_and_transforms(tmp_path):
    _write_images(tmp_path / "train" / "cat", 3)
    _write_images(tmp_path / "train" / "dog", 2, fmt="PNG")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image, not listed")
    ds = ImageFolderDataset(str(tmp_path), img_size=16, train=True)  # descends into train/
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    assert sorted(ds.targets) == [0, 0, 0, 1, 1]
    torch.manual_seed(0)
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1
    ev = ImageFolderDataset(str(tmp_path / "train"), img_size=16, train=False)
    a, _ = ev[0]
    b, _ = ev[0]
    assert torch.equal(a, b)  # eval transform is deterministic


def test_eval_transform_matches_resize_center_crop(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    ds = ImageFolderDataset(str(tmp_path), img_size=16, train=False)
    x, label = ds[0]
    assert label == -1  # flat folder
    # by hand: shorter side 30 -> int(16 / 0.875) = 18, width 30, center crop 16
    img = Image.fromarray(arr).resize((30, 18), Image.BICUBIC).crop((7, 1, 23, 17))
    ref = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    ref = (ref - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x, ref)


def test_random_resized_crop_box_ranges():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(64, 48, generator=g)
        assert 0 <= left and left + w <= 64 and 0 <= top and top + h <= 48
        assert 0.2 * 64 * 48 * 0.9 <= w * h <= 64 * 48
    # impossible aspect ratios fall back to the central crop with the ratio clamped
    assert random_resized_crop_box(100, 10, scale=(0.9, 1.0), ratio=(1.0, 1.0), generator=g) == (45, 0, 10, 10)


def test_random_resized_crop_draws_the_recipe_distribution():
    """RandomResizedCrop's draw (docs/tec.md §4): area fraction ~ U(0.2, 1), aspect ratio
    log-uniform on [3/4, 4/3], then the flip with p = 0.5. On a large square image the rejection
    of boxes that do not fit is symmetric in log aspect, so half the boxes are wider than tall
    (a ratio drawn uniformly on [3/4, 4/3] itself would make 57% of them wider)."""
    from tec_fast.data.transforms import draw_train_crop
    g = torch.Generator().manual_seed(1)
    boxes = [random_resized_crop_box(1000, 1000, generator=g) for _ in range(4000)]
    aspect = np.array([w / h for _, _, w, h in boxes])
    area = np.array([w * h for _, _, w, h in boxes]) / 1e6
    assert aspect.max() <= 4 / 3 * 1.005 and aspect.min() >= 3 / 4 / 1.005
    assert aspect.max() >= 4 / 3 * 0.99 and aspect.min() <= 3 / 4 / 0.99  # both ends are reached
    assert abs((aspect > 1).mean() - 0.5) < 0.035
    assert area.min() >= 0.2 * 0.99 and area.min() < 0.21 and area.max() > 0.97
    small = area[area < 0.75]  # every aspect fits below 3/4 of the image: uniform there, no rejection
    assert abs((small < 0.475).mean() - 0.5) < 0.035
    flips = []
    for seed in range(2000):
        torch.manual_seed(seed)
        flips.append(draw_train_crop(500, 375)[1])
    assert abs(np.mean(flips) - 0.5) < 0.04


def test_normalize_uses_imagenet_statistics():
    """(x / 255 - mean) / std per channel, R, G, B, with ImageNet's mean (0.485, 0.456, 0.406)
    and std (0.229, 0.224, 0.225), written out here."""
    from tec_fast.data.transforms import normalize
    x = torch.tensor([[[255]], [[0]], [[128]]], dtype=torch.uint8)  # [3, 1, 1]
    want = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    torch.testing.assert_close(normalize(x).flatten(), want, atol=1e-6, rtol=1e-6)


def test_class_folders_sorted_by_code_point(tmp_path):
    """Class indices follow the folder names sorted by code point, as torchvision's ImageFolder
    numbers them ("B" before "a"): a checkpoint's head and a probe's labels mean the same classes."""
    for name in ("a", "B", "c"):
        _write_images(tmp_path / name, 1)
    ds = ImageFolderDataset(str(tmp_path), img_size=8)
    assert ds.classes == ["B", "a", "c"]
    assert [(os.path.basename(os.path.dirname(p)), t) for p, t in ds.samples] == [("B", 0), ("a", 1), ("c", 2)]


def test_flat_folder_unlabelled(tmp_path):
    _write_images(tmp_path, 3)
    ds = ImageFolderDataset(str(tmp_path), img_size=8)
    assert ds.classes == [] and ds.targets == [-1, -1, -1]


def test_bad_images_skipped_and_counted(tmp_path):
    good = _write_images(tmp_path / "a", 2)
    # listing order img0, img05_text, img1, z_truncated: each bad file is followed by a good one
    _truncated_jpeg(tmp_path / "a" / "z_truncated.jpg")
    (tmp_path / "a" / "img05_text.jpg").write_text("this is not a JPEG")
    ds = ImageFolderDataset(str(tmp_path), img_size=8, train=False)
    assert len(ds) == 4
    paths = [p for p, _ in ds.samples]
    bad_trunc = paths.index(str(tmp_path / "a" / "z_truncated.jpg"))
    bad_text = paths.index(str(tmp_path / "a" / "img05_text.jpg"))
    with pytest.warns(RuntimeWarning, match="img05_text.jpg"):
        x, _ = ds[bad_text]
    assert x.shape == (3, 8, 8)
    with pytest.warns(RuntimeWarning, match="z_truncated.jpg"):
        y, _ = ds[bad_trunc]
    torch.testing.assert_close(y, ds[0][0])  # the stand-in is the next readable one (wrapping)
    assert ds.num_skipped == 2
    assert sorted(ds.skipped_paths()) == sorted(paths[i] for i in (bad_text, bad_trunc))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are not decoded or warned about again
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 4 and ds.num_skipped == 2
    assert all(str(p) in paths for p in good)


def test_bad_images_counted_across_workers(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "zz_bad.jpg").write_bytes(b"\x00" * 100)
    ds = ImageFolderDataset(str(tmp_path), img_size=8, train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(b[0].shape[0] for b in batches) == 4  # batch sizes kept: a good image stands in
    assert ds.num_skipped == 1


def test_strict_raises_with_path(tmp_path):
    _write_images(tmp_path, 1)
    _truncated_jpeg(tmp_path / "broken.jpg")
    ds = ImageFolderDataset(str(tmp_path), img_size=8, strict=True)
    i = [p for p, _ in ds.samples].index(str(tmp_path / "broken.jpg"))
    with pytest.raises(UnreadableImage, match="broken.jpg"):
        ds[i]


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolderDataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(str(tmp_path / "empty"))
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.jpg").write_text("nope")
    ds = ImageFolderDataset(str(tmp_path / "allbad"), img_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="none of the 1 images"):
            ds[0]


def test_a_symlink_loop_lists_each_image_once(tmp_path):
    """os.walk(followlinks=True) followed cat/again -> ../cat down to the kernel's link limit:
    3 images listed 41 times each, silently."""
    from tec_fast.data.folder import find_samples
    _write_images(tmp_path / "cat", 3)
    _write_images(tmp_path / "dog", 2)
    os.symlink("../cat", tmp_path / "cat" / "again")
    os.symlink("../dog", tmp_path / "cat" / "other")  # another class's folder, once: listed (the user's choice)
    with pytest.warns(RuntimeWarning, match=r"cat/again is a link to a folder already listed") as caught:
        samples, classes = find_samples(str(tmp_path))
    assert len(caught) == 1 and classes == ["cat", "dog"]
    assert [os.path.relpath(p, tmp_path) for p, _ in samples] == [
        "cat/img0.jpg", "cat/img1.jpg", "cat/img2.jpg", "cat/other/img0.jpg", "cat/other/img1.jpg",
        "dog/img0.jpg", "dog/img1.jpg"]


def test_a_subfolder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """A folder below a class folder that cannot be listed (no permission: simulated, the tests
    may run as root) was skipped by os.walk without a word."""
    from tec_fast.data.folder import find_samples
    _write_images(tmp_path / "cat", 2)
    _write_images(tmp_path / "cat" / "locked", 2)
    _write_images(tmp_path / "dog", 1)
    locked, scandir = str(tmp_path / "cat" / "locked"), os.scandir

    def refuse(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.warns(RuntimeWarning, match=r"cat/locked cannot be listed \(Permission denied\): its images are not read"):
        samples, classes = find_samples(str(tmp_path))
    assert classes == ["cat", "dog"] and len(samples) == 3


def test_images_that_are_not_read_are_counted_and_named(tmp_path):
    """Images beside class folders, and files of image formats outside IMG_EXTENSIONS, were left
    out without a word (a class folder of GIFs only is no class: the later labels shift). The
    files read stay the same."""
    from tec_fast.data.folder import find_samples
    _write_images(tmp_path / "cat", 3)
    _write_images(tmp_path / "dog", 2, fmt="GIF")
    for i in range(5):
        (tmp_path / f"loose{i}.jpg").write_bytes((tmp_path / "cat" / "img0.jpg").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image: not counted")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples, classes = find_samples(str(tmp_path))
    assert classes == ["cat"] and len(samples) == 3
    assert sorted(str(w.message) for w in caught) == [
        f"2 files under {tmp_path} have an image extension that is not read (first: {tmp_path}/dog/img0.gif); "
        "only .jpg, .jpeg, .png, .ppm, .pgm, .bmp, .tif, .tiff, .webp are",
        f"5 images directly in {tmp_path} (first: loose0.jpg) are not read: beside class folders, only the "
        "images inside those are"]
    flat = tmp_path / "cat"
    (flat / "x.jfif").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match=r"1 files under .*cat have an image extension that is not read "
                                            r"\(first: .*x\.jfif\)"):
        assert len(find_samples(str(flat))[0]) == 3


def _filled(mode, value, size=(6, 4)):
    return Image.new(mode, size, value)


def _array(mode, values):
    a = np.asarray(values)
    if mode in ("I;16", "I;16B"):
        return Image.frombytes(mode, (a.shape[1], a.shape[0]), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    return Image.fromarray(a.astype({"L": np.uint8, "I": np.int32, "F": np.float32}[mode]))


def _palette():
    img = Image.new("P", (6, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    return img


# (mode, image, expected RGB of pixel (0, 0), and of pixel (1, 0) where the image has two values)
MODES = [
    ("1", _array("L", [[255, 0]]).convert("1"), (255, 255, 255), (0, 0, 0)),
    ("L", _filled("L", 100), (100, 100, 100), None),
    ("P", _palette(), (10, 20, 30), None),
    ("PA", _palette().convert("PA"), (10, 20, 30), None),
    ("LA", _filled("LA", (100, 50)), (100, 100, 100), None),           # alpha dropped
    ("La", _filled("La", (100, 255)), (100, 100, 100), None),
    ("RGBA", _filled("RGBA", (10, 20, 30, 0)), (10, 20, 30), None),
    ("RGBa", _filled("RGBa", (10, 20, 30, 255)), (10, 20, 30), None),
    ("RGBX", _filled("RGBX", (10, 20, 30, 0)), (10, 20, 30), None),
    ("CMYK", _filled("CMYK", (0, 255, 255, 0)), (255, 0, 0), None),
    ("YCbCr", _filled("YCbCr", (128, 128, 128)), (128, 128, 128), None),
    ("HSV", _filled("HSV", (0, 255, 255)), (255, 0, 0), None),
    ("I;16", _array("I;16", [[65535, 1000]]), (255, 255, 255), (4, 4, 4)),      # 16-bit: not white
    ("I;16B", _array("I;16B", [[32768, 0]]), (128, 128, 128), (0, 0, 0)),
    ("I", _array("I", np.array([[40000, 257]], dtype=np.int32)), (156, 156, 156), (1, 1, 1)),
    ("I", _array("I", np.array([[-100, 100]], dtype=np.int32)), (0, 0, 0), (255, 255, 255)),  # own range
    ("F", _array("F", np.array([[0.5, 1.0]], dtype=np.float32)), (128, 128, 128), (255, 255, 255)),
    ("F", _array("F", np.array([[200.0, np.nan]], dtype=np.float32)), (200, 200, 200), (0, 0, 0)),
    ("F", _array("F", np.array([[-2.0, 2.0]], dtype=np.float32)), (0, 0, 0), (255, 255, 255)),
]


@pytest.mark.parametrize("mode, img, first, second", MODES, ids=[f"{m}-{i}" for i, (m, *_) in enumerate(MODES)])
def test_every_mode_decodes_to_rgb_in_its_real_range(tmp_path, mode, img, first, second):
    assert img.mode == mode
    decoded = [to_rgb(img)]
    for fmt, ext in (("PNG", "png"), ("TIFF", "tif")):  # and through a file, where a format keeps the mode
        try:
            img.save(tmp_path / f"x.{ext}", fmt)
        except (OSError, ValueError, KeyError):
            continue
        with Image.open(tmp_path / f"x.{ext}") as reread:
            if reread.mode == mode or (mode == "I;16B" and reread.mode.startswith("I;16")):
                decoded.append(to_rgb(reread))
                break
    for rgb in decoded:
        assert rgb.mode == "RGB"
        assert rgb.getpixel((0, 0)) == first
        if second is not None:
            assert rgb.getpixel((1, 0)) == second


def test_sixteen_bit_png_through_the_dataset(tmp_path):
    """A mid-grey 16-bit PNG is mid-grey after loading, not white (convert('RGB') clips it)."""
    (tmp_path / "c").mkdir()
    Image.fromarray(np.full((16, 16), 30000, dtype=np.uint16)).save(tmp_path / "c" / "x.png")
    with Image.open(tmp_path / "c" / "x.png") as img:
        assert img.mode.startswith("I;16")
    x, _ = ImageFolderDataset(str(tmp_path), img_size=8, train=False)[0]
    pixel = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(pixel, torch.full_like(pixel, round(30000 / 257) / 255), atol=2 / 255)
