"""Local Hugging Face dataset folders read with pyarrow alone: save_to_disk (Arrow) and Parquet
layouts give the folder's samples, class names from the ClassLabel feature, bad rows skipped
and counted, DataLoader workers reopen the files, and training from one resumes exactly."""
from __future__ import annotations

import json
import os
import pathlib
import warnings

import pytest
import torch

pa = pytest.importorskip("pyarrow")

from data_helpers import write_folder, write_hf_arrow, write_hf_parquet  # noqa: E402
from tec_fast.data.folder import ImageFolderDataset  # noqa: E402
from tec_fast.data.hf import HFImageDataset  # noqa: E402
from tec_fast.data.sources import data_kind, open_dataset  # noqa: E402
from test_shards import resumes_exactly  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("hf_src"), n=14, png_every=5, seed=3)


@pytest.mark.parametrize("layout", ["arrow", "dataset_dict", "parquet"])
def test_hf_folder_gives_the_folder_samples(root, tmp_path, layout):
    if layout == "parquet":
        path = write_hf_parquet(tmp_path / "pq", root)
    else:
        path = write_hf_arrow(tmp_path / "hf", root, dataset_dict=layout == "dataset_dict")
    assert data_kind(path) == "hf"
    ds = open_dataset(path, img_size=16, train=True, uint8=True)
    assert isinstance(ds, HFImageDataset) and ds.format == ("parquet" if layout == "parquet" else "arrow")
    folder = ImageFolderDataset(root, img_size=16, train=True, uint8=True)
    assert len(ds) == 14 and ds.classes == ["cat", "dog"] and ds.targets == folder.targets
    for i in (13, 0, 6, 4):  # out of order: parquet row groups of 5 are read as needed
        torch.manual_seed(i)
        a, la = ds[i]
        torch.manual_seed(i)
        b, lb = folder[i]
        assert torch.equal(a, b) and la == lb
    loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2)  # workers reopen the files
    assert sum(len(x) for x, _ in loader) == 14


def test_bad_rows_skipped_and_counted(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    good = open(sorted(os.path.join(dp, f) for dp, _, fs in os.walk(write_folder(tmp_path / "src", n=2))
                       for f in fs)[0], "rb").read()
    table = pa.table({"img": pa.array([{"bytes": b"junk", "path": None}, {"bytes": good, "path": None}],
                                      type=image_type)})
    os.makedirs(tmp_path / "hf")
    with pa.ipc.new_stream(str(tmp_path / "hf" / "data.arrow"), table.schema) as w:
        w.write_table(table)
    (tmp_path / "hf" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    ds = HFImageDataset(str(tmp_path / "hf"), img_size=8)
    assert ds.targets == [-1, -1] and ds.classes == [] and ds.image_column == "img"
    with pytest.warns(RuntimeWarning, match=r"data\.arrow\[0\]"):
        x, _ = ds[0]
    assert x.shape == (3, 8, 8) and ds.num_skipped == 1


def test_hf_errors(tmp_path):
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["a", "b"]}))
    with pytest.raises(ValueError, match="none named 'train'"):
        HFImageDataset(str(tmp_path / "dd"))
    import pyarrow.parquet as pq
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), str(tmp_path / "t" / "a.parquet"))
    with pytest.raises(ValueError, match="no image column"):
        HFImageDataset(str(tmp_path / "t"))
    with pytest.raises(ValueError, match="not a directory"):
        HFImageDataset(str(tmp_path / "nope"))


def test_training_from_an_hf_folder_resumes_exactly(root, tmp_path):
    path = write_hf_arrow(tmp_path / "hf", root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        resumes_exactly(tmp_path, lambda: HFImageDataset(path, img_size=16, uint8=True))


def test_path_only_rows_read_the_file(root, tmp_path):
    """``Dataset.to_parquet`` of file-backed images stores paths, not bytes: absolute or relative
    to the Parquet file's folder."""
    import pyarrow.parquet as pq

    from tec_fast.data.folder import find_samples
    samples, _ = find_samples(root)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "pq").mkdir()
    os.symlink(root, tmp_path / "pq" / "files")
    paths = [p if i % 2 else os.path.join("files", os.path.relpath(p, root)) for i, (p, _) in enumerate(samples)]
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": p} for p in paths], type=image_type),
                             "label": [label for _, label in samples]}), str(tmp_path / "pq" / "train.parquet"))
    ds = HFImageDataset(str(tmp_path / "pq"), img_size=16, train=False)
    folder = ImageFolderDataset(root, img_size=16, train=False)
    assert all(torch.equal(ds[i][0], folder[i][0]) for i in (0, 1, 2))
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "gone.jpg"}], type=image_type)}),
                   str(tmp_path / "pq" / "train.parquet"))
    with pytest.raises(Exception, match="gone.jpg"):
        HFImageDataset(str(tmp_path / "pq"), img_size=16, strict=True)[0]


def test_path_only_rows_are_not_read_from_the_working_directory(root, tmp_path, monkeypatch):
    """A relative path was tried against the working directory first: a file of that name there
    was read as the row's image. And an empty image (bytes b"") was reported as a path-only row
    whose path does not exist, not as the empty file it is."""
    import pyarrow.parquet as pq

    from tec_fast.data.folder import UnreadableImage, find_samples
    (first, _), (second, _) = find_samples(root)[0][:2]
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "photo.jpg").write_bytes(open(first, "rb").read())
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "photo.jpg").write_bytes(open(second, "rb").read())  # another image, same name
    monkeypatch.chdir(tmp_path / "cwd")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": None, "path": "photo.jpg"}, {"bytes": b"", "path": "gone.jpg"},
            {"bytes": None, "path": "gone.jpg"}]
    pq.write_table(pa.table({"image": pa.array(rows, type=image_type)}), str(tmp_path / "pq" / "train.parquet"))
    ds = HFImageDataset(str(tmp_path / "pq"), img_size=16, train=False, strict=True)
    assert ds._read(0) == open(first, "rb").read()
    with pytest.raises(UnreadableImage, match=r"train\.parquet\[1\]: ValueError: empty file \(0 bytes\)"):
        ds[1]
    with pytest.raises(UnreadableImage, match=r"path only, 'gone.jpg', and there is no such file \(\S*/pq/gone.jpg\)"):
        ds[2]


def test_null_labels_are_unlabelled_and_the_image_column_is_preferred(root, tmp_path):
    """A row whose label is null is unlabelled (-1), not class 0; and of the image columns a
    table may have, "image" is read before "img"."""
    import pyarrow.parquet as pq

    from tec_fast.data.folder import find_samples
    samples, _ = find_samples(root)
    raw = [pathlib.Path(p).read_bytes() for p, _ in samples[:3]]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"img": pa.array(raw[::-1], pa.binary()), "image": pa.array(raw, pa.binary()),
                             "label": pa.array([1, None, 0], pa.int64())}), str(tmp_path / "pq" / "train.parquet"))
    ds = HFImageDataset(str(tmp_path / "pq"), img_size=16, train=False)
    assert ds.targets == [1, -1, 0]
    folder = ImageFolderDataset(root, img_size=16, train=False)
    assert torch.equal(ds[0][0], folder[0][0]) and not torch.equal(ds[0][0], folder[2][0])
