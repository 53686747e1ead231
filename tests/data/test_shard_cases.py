"""Tar shards: how members group into samples (folders, case, two-part label extensions, long
ustar names), labels, brace patterns of several groups, folder order, members cut short after
indexing, and the count of keys left out over several shards."""
from __future__ import annotations

import io
import random
import tarfile
import warnings

import pytest
from PIL import Image

from tec_fast.data.shards import TarShardDataset, expand_braces, index_shards, shard_paths


def _png(colour=(10, 20, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members, fmt=tarfile.GNU_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _quiet_dataset(spec, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these shards leaves a key out
        return TarShardDataset(spec, img_size=8, train=False, processes=1, **kw)


def test_the_same_file_name_in_two_folders_is_two_samples(tmp_path):
    ds = _quiet_dataset(_tar(tmp_path / "s.tar", [("a/k.png", _png()), ("a/k.cls", b"0"),
                                                   ("b/k.png", _png()), ("b/k.cls", b"1")]))
    assert len(ds) == 2 and ds.targets == [0, 1]
    assert ds.names == [f"{tmp_path}/s.tar:a/k", f"{tmp_path}/s.tar:b/k"]


def test_two_part_label_extensions_and_upper_case_image_extensions_are_read(tmp_path):
    ds = _quiet_dataset(_tar(tmp_path / "s.tar", [("k1.PNG", _png()), ("k1.cls.txt", b"3\n"),
                                                   ("k2.Png", _png()), ("k2.label.txt", b" 7 ")]))
    assert ds.targets == [3, 7] and ds.names == [f"{tmp_path}/s.tar:k1", f"{tmp_path}/s.tar:k2"]


def test_a_key_without_a_label_is_unlabelled(tmp_path):
    ds = _quiet_dataset(_tar(tmp_path / "s.tar", [("k1.png", _png()), ("k2.png", _png()), ("k2.cls", b"0")]))
    assert ds.targets == [-1, 0]


def test_long_ustar_names_keep_their_folder(tmp_path):
    folder = "f" * 120
    ds = _quiet_dataset(_tar(tmp_path / "s.tar", [(f"{folder}/k.png", _png()), (f"{folder}/k.cls", b"2")],
                             fmt=tarfile.USTAR_FORMAT))
    assert ds.names == [f"{tmp_path}/s.tar:{folder}/k"] and ds.targets == [2]


def test_a_folder_of_shards_is_read_in_name_order(tmp_path):
    names = [f"part-{i:02d}.tar" for i in range(12)]
    random.Random(3).shuffle(names)
    for name in names:
        _tar(tmp_path / name, [(f"{name}.png", _png())])
    assert shard_paths(str(tmp_path)) == [str(tmp_path / f"part-{i:02d}.tar") for i in range(12)]


def test_brace_patterns_of_several_groups_multiply_out():
    assert expand_braces("s-{0..1}-{x,y}.tar") == ["s-0-x.tar", "s-0-y.tar", "s-1-x.tar", "s-1-y.tar"]
    assert expand_braces("{a,b}/{08..10}.tar") == ["a/08.tar", "a/09.tar", "a/10.tar",
                                                    "b/08.tar", "b/09.tar", "b/10.tar"]


def test_a_member_cut_short_after_indexing_is_skipped_and_named(tmp_path):
    path = _tar(tmp_path / "s.tar", [("k1.png", _png((1, 2, 3))), ("k2.png", _png((200, 2, 3)))])
    ds = TarShardDataset(path, img_size=8, train=False, processes=1)
    _, offset, size = ds._where[1]  # (shard, offset, size) of k2's image
    with open(path, "r+b") as f:
        f.truncate(offset + size // 2)  # shard cut after it was opened: k2 loses its second half
    with pytest.warns(RuntimeWarning, match=r"s\.tar:k2 .*member cut short"):
        ds[1]
    assert ds.skipped_paths() == [f"{path}:k2"]


def test_keys_left_out_are_counted_over_every_shard(tmp_path):
    def shard(name, lost):
        return _tar(tmp_path / name, [("img.png", _png())] + [(f"x{i}.txt", b"t") for i in range(lost)])
    paths = [shard("a.tar", 1), shard("b.tar", 3), shard("c.tar", 2)]
    with pytest.warns(RuntimeWarning) as caught:
        index_shards(paths, processes=1)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"tar shard {paths[0]}: 1 keys (first: 'x0')")
    assert message.endswith(", and 5 more in 2 other shards"), message
