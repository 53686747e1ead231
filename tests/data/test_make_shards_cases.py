"""python -m tec_fast.make_shards: the shard limits it hands write_shards (MB of 2^20 bytes, 5000
images by default), an OUT beside SRC whose name starts with SRC's, a prefix with a brace, and
which folder a file error is blamed on when SRC lies inside OUT."""
from __future__ import annotations

import os

import pytest

from data_helpers import write_folder
from tec_fast.cli import make_shards
from tec_fast.data import shards


def _recording(monkeypatch):
    seen = {}

    def fake(root, output, **kwargs):
        seen.update(kwargs)
        shard = os.path.join(output, "shard-000000.tar")
        return {"shards": [shard], "pattern": shard,
                "images": 0, "bytes": 0, "image_bytes": 0, "classes": [], "removed": [], "skipped": {}}
    monkeypatch.setattr(shards, "write_shards", fake)
    return seen


def test_shard_limits_given_to_the_writer(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "src", n=2)
    seen = _recording(monkeypatch)
    assert make_shards.main([root, str(tmp_path / "o"), "--no-progress"]) == 0
    assert seen["max_images"] == 5000 and seen["max_bytes"] == 1024 * 2 ** 20 and seen["prefix"] == "shard"
    assert make_shards.main([root, str(tmp_path / "o2"), "--max-mb", "3", "--max-images", "7", "--prefix", "p",
                             "--no-progress"]) == 0
    assert seen["max_images"] == 7 and seen["max_bytes"] == 3 * 1048576 and seen["prefix"] == "p"


def test_an_out_beside_src_sharing_its_name_prefix_is_allowed(tmp_path, capsys):
    root = write_folder(tmp_path / "imgs", n=4)
    out = tmp_path / "imgs2"
    assert make_shards.main([root, str(out), "--no-progress"]) == 0
    assert (out / "shard-000000.tar").is_file() and (out / "shards.json").is_file()


def test_a_prefix_with_a_brace_is_refused(tmp_path, capsys):
    root = write_folder(tmp_path / "src", n=2)
    for prefix in ("a{b", "a}b"):
        with pytest.raises(SystemExit) as info:
            make_shards.main([root, str(tmp_path / "o"), "--prefix", prefix])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("error: argument --prefix: must be a plain file-name prefix")
    assert not (tmp_path / "o").exists()


def test_a_file_error_under_src_inside_out_names_src(tmp_path, capsys, monkeypatch):
    """SRC may lie inside OUT: a file under SRC is SRC's (the innermost folder holding it)."""
    out = tmp_path / "out"
    root = write_folder(out / "src", n=2)
    bad = os.path.join(root, "cat", "img00.jpg")

    def failing(*a, **k):
        raise PermissionError(13, "Permission denied", bad)
    monkeypatch.setattr(shards, "write_shards", failing)
    assert make_shards.main([root, str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"error: argument SRC: Permission denied: {bad!r}"


def test_out_beside_the_train_folder_of_src_is_allowed(tmp_path):
    """SRC/train is the image folder read where it exists: OUT = SRC/shards is outside it."""
    src = tmp_path / "src"
    write_folder(src / "train", n=4)
    assert make_shards.main([str(src), str(src / "shards"), "--no-progress"]) == 0
    assert (src / "shards" / "shard-000000.tar").is_file()
