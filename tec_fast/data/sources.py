"""``--data`` to a dataset: an image folder, webdataset-style tar shards, or a local Hugging Face
``datasets`` folder, told apart by what is on disk."""
from __future__ import annotations

import os

from tec_fast.data.dataset import ImageDataset


def data_kind(spec: str) -> str:
    """'shards' (a .tar path, a brace pattern, or a folder of only .tar files), 'hf' (a
    ``save_to_disk`` folder or a folder of Parquet files) or 'folder'. ValueError when ``spec``
    is none of them."""
    from tec_fast.data.hf import is_hf_folder
    from tec_fast.data.shards import is_shard_spec

    if is_shard_spec(spec):
        return "shards"
    if is_hf_folder(spec):
        return "hf"
    if os.path.isdir(spec):
        return "folder"
    raise ValueError(f"{spec!r} is not a folder, a .tar shard or a shard pattern like shards-{{0000..0099}}.tar")


def open_dataset(spec: str, **kwargs) -> ImageDataset:
    """The dataset ``spec`` names (``data_kind``), built with ``ImageDataset``'s keywords."""
    kind = data_kind(spec)
    if kind == "shards":
        from tec_fast.data.shards import TarShardDataset
        return TarShardDataset(spec, **kwargs)
    if kind == "hf":
        from tec_fast.data.hf import HFImageDataset
        return HFImageDataset(spec, **kwargs)
    from tec_fast.data.folder import ImageFolderDataset
    return ImageFolderDataset(spec, **kwargs)
