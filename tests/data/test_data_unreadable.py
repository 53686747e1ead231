"""Evaluation's rule for unreadable images (``drop_unreadable``: left out, not replaced), the
messages of empty and unknown files, per-file row numbers in Hugging Face sample names, and the
evaluation crop of extreme aspect ratios (only the crop is resampled)."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import smooth_image, write_folder
from tec_fast.data.dataset import collate_readable
from tec_fast.data.decode import EncodedImage
from tec_fast.data.folder import ImageFolderDataset
from tec_fast.data.transforms import eval_crop


def _bad_folder(tmp_path):
    root = write_folder(tmp_path / "f", n=4, classes=("a",))
    (tmp_path / "f" / "a" / "img01.jpg").write_bytes(b"")  # empty
    (tmp_path / "f" / "a" / "img02.jpg").write_bytes(b"not an image at all")
    return root


def test_drop_unreadable_leaves_bad_items_out(tmp_path):
    ds = ImageFolderDataset(_bad_folder(tmp_path), img_size=8, train=False, drop_unreadable=True)
    assert len(ds) == 4
    with pytest.warns(RuntimeWarning, match=r"img01\.jpg .*empty file.*left out"):
        assert ds[1] is None  # not the next readable image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_readable)
        batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [1, 1]  # img00 | img03: two images read, two left out
    assert ds.num_skipped == 2 and [os.path.basename(p) for p in ds.skipped_paths()] == ["img01.jpg", "img02.jpg"]
    assert collate_readable([None, None]) is None


def test_empty_and_unknown_files_say_what_they_are():
    with pytest.raises(ValueError, match="empty file"):
        EncodedImage(b"")
    with pytest.raises(OSError) as info:
        EncodedImage(b"not an image at all")
    assert "BytesIO" not in str(info.value) and "not an image format" in str(info.value)


def _png(arr) -> EncodedImage:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return EncodedImage(buf.getvalue())


def _whole_resize_crop(arr, size):
    """The evaluation crop as it always was: the whole image resized, then the centre crop."""
    img = Image.fromarray(arr)
    resize_to, short = int(size / 0.875), min(img.size)
    w = max(size, round(img.width * resize_to / short))
    h = max(size, round(img.height * resize_to / short))
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return np.asarray(img.resize((w, h), Image.BICUBIC).crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("w, h, size", [(40, 30, 16), (30, 40, 32), (500, 375, 224), (375, 500, 37),
                                        (33, 77, 16), (160, 41, 32)])
def test_eval_crop_of_normal_images_is_unchanged(w, h, size):
    arr = smooth_image(np.random.default_rng(w * h), w, h)
    out = eval_crop(_png(arr), size).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(out, _whole_resize_crop(arr, size))


def test_eval_crop_of_extreme_aspect_ratios_resamples_only_the_crop(monkeypatch):
    sizes = []
    resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))  # refused before PIL allocates the whole resize (gigabytes at 1 x 16 000)
        assert size[0] * size[1] <= 224 * 224, f"resized to {size}"
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    rng = np.random.default_rng(0)
    for w, h in ((4000, 2), (1, 16000)):  # the whole resize: 512 000 x 256 and 256 x 4 096 000 pixels
        out = eval_crop(_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), 224)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert sizes == [(224, 224), (224, 224)]
    monkeypatch.setattr(Image.Image, "resize", resize)
    for w, h, size in ((600, 20, 16), (20, 600, 16), (900, 200, 64)):  # small enough to compare
        arr = smooth_image(rng, w, h)
        out = eval_crop(_png(arr), size).permute(1, 2, 0).numpy().astype(int)
        assert np.abs(out - _whole_resize_crop(arr, size)).max() <= 1


def test_hf_sample_names_count_rows_per_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = open(sorted(os.path.join(dp, f) for dp, _, fs in os.walk(write_folder(tmp_path / "src", n=2))
                       for f in fs)[0], "rb").read()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "hf").mkdir()
    for k, rows in enumerate(([good, good, good], [good, b"junk"])):
        table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in rows], type=image_type)})
        pq.write_table(table, str(tmp_path / "hf" / f"train-0000{k}.parquet"))
    from tec_fast.data.hf import HFImageDataset

    ds = HFImageDataset(str(tmp_path / "hf"), img_size=8, drop_unreadable=True)
    assert ds.names == ["train-00000.parquet[0]", "train-00000.parquet[1]", "train-00000.parquet[2]",
                        "train-00001.parquet[0]", "train-00001.parquet[1]"]
    with pytest.warns(RuntimeWarning, match=r"train-00001\.parquet\[1\]"):
        assert ds[4] is None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_with_an_image_name_is_skipped_not_waited_on(tmp_path):
    """Opening a named pipe for reading waits for a writer: a pipe called img01.jpg in a class
    folder (left by a tool that streams images) stopped the worker that met it for good."""
    import threading

    root = write_folder(tmp_path / "f", n=4, classes=("a",))
    fifo = tmp_path / "f" / "a" / "img01.jpg"
    fifo.unlink()
    os.mkfifo(fifo)
    ds = ImageFolderDataset(root, img_size=8, train=False)
    got = {}

    def load():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got["item"] = ds[1]
        got["warnings"] = [str(w.message) for w in caught]

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # free the blocked open (a writer that closes at once) before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("reading a named pipe called img01.jpg blocked the loader")
    assert got["item"][0].shape == (3, 8, 8)  # the next readable image instead
    assert ds.skipped_paths() == [str(fifo)]
    assert any("img01.jpg (OSError: a named pipe, not an image file)" in w for w in got["warnings"]), got["warnings"]
