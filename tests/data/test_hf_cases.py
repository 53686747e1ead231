"""Hugging Face folders: which files and split are read, which column is the label, class names
from the Parquet metadata, unlabelled Parquet of several row groups, and where a path-only
image is looked for first."""
from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from tec_fast.data.hf import HFImageDataset  # noqa: E402

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _images(n):
    return pa.array([{"bytes": _png((i, 0, 0)), "path": None} for i in range(n)], type=IMAGE)


def test_parquet_train_files_are_read_and_the_others_not(tmp_path):
    pq.write_table(pa.table({"image": _images(2), "label": [0, 1]}), str(tmp_path / "train-0.parquet"))
    pq.write_table(pa.table({"image": _images(3), "label": [1, 1, 1]}), str(tmp_path / "test-0.parquet"))
    ds = HFImageDataset(str(tmp_path), img_size=8)
    assert ds.files == [str(tmp_path / "train-0.parquet")] and ds.targets == [0, 1]


def test_a_dataset_dict_reads_its_train_split_wherever_it_is_listed(tmp_path):
    for split, labels in (("test", [5]), ("train", [2, 3])):
        pq.write_table(pa.table({"image": _images(len(labels)), "label": labels}),
                       str(tmp_path / f"{split}.parquet"))
        os.makedirs(tmp_path / split)
        os.replace(tmp_path / f"{split}.parquet", tmp_path / split / "part.parquet")
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    ds = HFImageDataset(str(tmp_path), img_size=8)
    assert ds.targets == [2, 3]


def test_a_label_column_of_text_is_not_the_label(tmp_path):
    pq.write_table(pa.table({"image": _images(2), "label": ["cat", "dog"], "cls": [4, 5]}),
                   str(tmp_path / "train.parquet"))
    ds = HFImageDataset(str(tmp_path), img_size=8)
    assert ds.label_column == "cls" and ds.targets == [4, 5]


def test_class_names_come_from_the_parquet_metadata(tmp_path):
    table = pa.table({"image": _images(2), "label": [1, 0]})
    info = {"info": {"features": {"label": {"_type": "ClassLabel", "names": ["cat", "dog"]}}}}
    table = table.replace_schema_metadata({b"huggingface": json.dumps(info).encode()})
    pq.write_table(table, str(tmp_path / "train.parquet"))
    ds = HFImageDataset(str(tmp_path), img_size=8)
    assert ds.classes == ["cat", "dog"] and ds.targets == [1, 0]


def test_unlabelled_parquet_of_several_row_groups_is_unlabelled_throughout(tmp_path):
    pq.write_table(pa.table({"image": _images(5)}), str(tmp_path / "train.parquet"), row_group_size=2)
    ds = HFImageDataset(str(tmp_path), img_size=8, uint8=True)
    assert len(ds) == 5 and ds.targets == [-1] * 5
    assert [int(ds[i][0][0, 4, 4]) for i in (4, 0, 3)] == [4, 0, 3]


def test_a_relative_path_is_looked_for_beside_the_data_file_first(tmp_path):
    os.makedirs(tmp_path / "data")
    (tmp_path / "data" / "x.png").write_bytes(_png((200, 0, 0)))
    (tmp_path / "x.png").write_bytes(_png((50, 0, 0)))
    rows = pa.array([{"bytes": None, "path": "x.png"}], type=IMAGE)
    pq.write_table(pa.table({"image": rows}), str(tmp_path / "data" / "train.parquet"))
    ds = HFImageDataset(str(tmp_path), img_size=8, uint8=True)
    assert int(ds[0][0][0, 4, 4]) == 200
