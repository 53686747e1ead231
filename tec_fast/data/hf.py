"""A local Hugging Face ``datasets`` folder as a dataset, read with ``pyarrow`` alone (the
``datasets`` package is not needed).

Layouts read:
- ``Dataset.save_to_disk`` folders: ``state.json`` listing Arrow stream files (``data-*.arrow``)
  and ``dataset_info.json``; a ``DatasetDict`` folder (``dataset_dict.json``) reads its ``train``
  split, or the only split there is;
- folders of Parquet files (``*.parquet``, also under ``data/``; a hub download): ``train-*``
  files when there are any.

The image column is the first of image / img / jpg / jpeg / png / webp (or else the first column) that
holds an ``Image`` feature (struct of ``bytes`` and ``path``; a row with a path and no bytes is read
from that file, as ``Dataset.to_parquet`` of file-backed images leaves them) or raw bytes; the label is
``label`` / ``labels`` / ``cls`` (-1 without one); class names come from the ``ClassLabel``
feature in ``dataset_info.json`` or the Parquet schema's ``huggingface`` metadata.

Arrow files are memory-mapped (opened again in each worker, never pickled): ``ds[i]`` is a
zero-copy slice. Parquet is compressed by row group, so ``ds[i]`` reads (and keeps, one per
worker) the row group holding image ``i``: fine for small sets, slow for big ones read in random
order. For those, write Arrow (``save_to_disk``) or tar shards (``python -m tec_fast.make_shards``).
Transforms, ``uint8`` and the skip-and-count rule: ``ImageDataset``.
"""
from __future__ import annotations

import glob
import json
import os
from typing import List, Optional, Tuple

from tec_fast.data.dataset import ImageDataset, read_file

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "cls")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
        return pyarrow
    except ImportError:
        raise ValueError("reading a Hugging Face datasets folder needs pyarrow (pip install pyarrow, "
                         "or the package's [data] extra)") from None


def is_hf_folder(path: str) -> bool:
    """A ``save_to_disk`` folder (``state.json`` / ``dataset_dict.json``) or a folder of Parquet files."""
    if not os.path.isdir(path):
        return False
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")) \
        or bool(_parquet_files(path))


def _parquet_files(path: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(path, "*.parquet")) + glob.glob(os.path.join(path, "data", "*.parquet")))
    train = [f for f in files if os.path.basename(f).startswith("train")]
    return train or files


def _resolve(path: str) -> Tuple[str, List[str], Optional[dict]]:
    """(format 'arrow' | 'parquet', files, dataset_info or None)."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise ValueError(f"{path!r} is a DatasetDict with splits {splits} and none named 'train': "
                             f"point --data at the split's folder")
        return _resolve(os.path.join(path, split))
    if os.path.isfile(os.path.join(path, "state.json")):
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        files = [os.path.join(path, d["filename"]) for d in state.get("_data_files", [])]
        info = None
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
            with open(os.path.join(path, "dataset_info.json")) as f:
                info = json.load(f)
        if not files:
            raise ValueError(f"{path}/state.json lists no data files")
        return "arrow", files, info
    files = _parquet_files(path)
    if not files:
        raise ValueError(f"{path!r} holds no Hugging Face dataset (state.json, dataset_dict.json or *.parquet)")
    return "parquet", files, None


def _pick_columns(schema, info: Optional[dict]) -> Tuple[str, Optional[str], List[str]]:
    pa = _pyarrow()

    def holds_bytes(t):
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)

    names = list(schema.names)
    candidates = [n for n in IMAGE_COLUMNS if n in names] + names
    image = next((n for n in candidates if holds_bytes(schema.field(n).type)), None)
    if image is None:
        raise ValueError(f"no image column (an Image feature or bytes) among the columns {names}")
    label = next((n for n in LABEL_COLUMNS if n in names and pa.types.is_integer(schema.field(n).type)), None)
    if info is None and schema.metadata and b"huggingface" in schema.metadata:
        info = json.loads(schema.metadata[b"huggingface"]).get("info")
    classes: List[str] = []
    feature = ((info or {}).get("features") or {}).get(label or "", {})
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        classes = [str(c) for c in feature.get("names", [])]
    return image, label, classes


class HFImageDataset(ImageDataset):
    """Images of a local Hugging Face dataset folder: ``ds[i] -> (image, label)`` as
    ``ImageFolderDataset`` gives for the same files (see the module docstring for layouts)."""

    kind = "hugging face"

    def __init__(self, path: str, img_size: int = 224, train: bool = True, strict: bool = False,
                 native_patch: Optional[int] = None, max_patches: Optional[int] = None,
                 min_patches: int = 1, uint8: bool = False, drop_unreadable: bool = False):
        pa = _pyarrow()
        if not os.path.isdir(path):
            raise ValueError(f"HFImageDataset: {path!r} is not a directory")
        super().__init__(img_size, train, strict, uint8, native_patch, max_patches, min_patches, drop_unreadable)
        self.root = path
        self.format, self.files, info = _resolve(path)
        self._where: List[Tuple[int, int, int]] = []  # (file, row group or 0, row) per sample
        labels: List[int] = []
        self.image_column = self.label_column = None
        for f, table_or_pq in enumerate(self._open_all(pa)):
            schema = table_or_pq.schema if self.format == "arrow" else table_or_pq.schema_arrow
            if self.image_column is None:
                self.image_column, self.label_column, classes = _pick_columns(schema, info)
            if self.format == "arrow":
                groups = [(0, table_or_pq.num_rows)]
                col = table_or_pq.column(self.label_column).to_pylist() if self.label_column else None
                labels.extend(col if col is not None else [-1] * table_or_pq.num_rows)
            else:
                meta = table_or_pq.metadata
                groups = [(g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
                if self.label_column:
                    labels.extend(table_or_pq.read(columns=[self.label_column]).column(0).to_pylist())
                else:
                    labels.extend([-1] * sum(n for _, n in groups))
            self._where.extend((f, g, r) for g, n in groups for r in range(n))
        if not self._where:
            raise ValueError(f"HFImageDataset: {path!r} holds no rows")
        names, row, last = [], 0, None  # "<file>[<row within that file>]"
        for f, _, _ in self._where:
            row = row + 1 if f == last else 0
            last = f
            names.append(f"{os.path.basename(self.files[f])}[{row}]")
        self._init_samples(names, [-1 if v is None else v for v in labels], classes)
        self._pid, self._tables, self._group = None, None, (None, None)

    def _open_all(self, pa):
        import pyarrow.parquet as pq

        if self.format == "arrow":
            return [pa.ipc.open_stream(pa.memory_map(f, "r")).read_all() for f in self.files]
        return [pq.ParquetFile(f) for f in self.files]

    def _column(self, f: int, g: int):
        if self._pid != os.getpid():  # first use in this process (or a forked worker): reopen
            self._pid, self._tables, self._group = os.getpid(), self._open_all(_pyarrow()), (None, None)
        if self.format == "arrow":
            return self._tables[f].column(self.image_column)
        if self._group[0] != (f, g):
            self._group = ((f, g), self._tables[f].read_row_group(g, columns=[self.image_column]).column(0))
        return self._group[1]

    def _read(self, i: int) -> bytes:
        f, g, r = self._where[i]
        value = self._column(f, g)[r].as_py()
        if isinstance(value, dict):
            if value.get("bytes") is None and value.get("path"):  # an Image feature that stores the path only
                return self._read_path(value["path"], f)
            value = value.get("bytes")
        if value is None:  # (b"" is an empty file, and the decoder says so)
            raise ValueError("the row holds no image bytes and no path")
        return value

    def _read_path(self, path: str, f: int) -> bytes:
        """A path-only image (``Dataset.to_parquet`` of images loaded from files writes these):
        absolute, or relative to the data file's folder or the dataset folder (never to the
        working directory, where a file of that name would be another image)."""
        places = [path] if os.path.isabs(path) else list(dict.fromkeys(
            os.path.normpath(os.path.join(folder, path)) for folder in (os.path.dirname(self.files[f]), self.root)))
        for candidate in places:
            if os.path.exists(candidate):
                return read_file(candidate)
        raise FileNotFoundError(f"the row's image is stored as a path only, {path!r}, and there is no such file "
                                f"({' or '.join(places)})")

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_pid=None, _tables=None, _group=(None, None))  # reopened (memory-mapped) where unpickled
        return state
