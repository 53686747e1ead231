"""make_shards into a folder that already holds shards: the stale ones are removed (a folder read
as --data holds one write); compressed or non-tar files named in one message; the command's
--prefix refusal and its progress line."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import pytest

from data_helpers import write_folder
from tec_fast.data.shards import TarShardDataset, write_shards


def test_rewrite_with_fewer_shards_removes_the_stale_ones(tmp_path):
    root = write_folder(tmp_path / "src", n=6)
    out = tmp_path / "out"
    first = write_shards(root, str(out), max_images=2)
    assert len(first["shards"]) == 3 and first["removed"] == []
    (out / "other-000005.tar").write_bytes(b"")  # another prefix: not this write's business
    again = write_shards(root, str(out), max_images=6)
    assert len(again["shards"]) == 1
    assert again["removed"] == [str(out / "shard-000001.tar"), str(out / "shard-000002.tar")]
    assert sorted(os.listdir(out)) == ["classes.txt", "other-000005.tar", "shard-000000.tar"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in os.listdir(os.path.join(root, "cat")):
        os.link(os.path.join(root, "cat", name), flat / name)
    unlabelled = write_shards(str(flat), str(out), max_images=6)
    assert unlabelled["removed"] == [str(out / "classes.txt")]  # the old names would label these images
    assert len(TarShardDataset(str(out / "shard-000000.tar"), img_size=8)) == 3


def test_compressed_and_non_tar_files_are_named(tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("0.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "z.tar").write_bytes(gzip.compress(raw.getvalue()))
    with pytest.raises(ValueError, match=r"z\.tar' is not a readable uncompressed tar shard \(it is gzip-compressed"):
        TarShardDataset(str(tmp_path / "z.tar"))
    (tmp_path / "t.tar").write_bytes(b"hello world, not a tar at all " * 40)  # octal fields that are text
    with pytest.raises(ValueError, match=r"t\.tar' is not a readable uncompressed tar shard \(not a tar header"):
        TarShardDataset(str(tmp_path / "t.tar"))


def test_make_shards_command_reports_removals_and_the_final_count(tmp_path, capsys):
    from tec_fast.cli.make_shards import main

    root = write_folder(tmp_path / "src", n=6)
    assert main([root, str(tmp_path / "o"), "--max-images", "2"]) == 0
    err = capsys.readouterr().err
    assert err.rsplit("\r", 1)[1].startswith("6 images, ") and err.endswith(" img/s\n")  # the final count
    assert main([root, str(tmp_path / "o"), "--max-images", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"removed {tmp_path / 'o' / 'shard-000002.tar'}" in out
    record = json.loads((tmp_path / "o" / "shards.json").read_text())
    assert record["removed"] == [str(tmp_path / "o" / "shard-000002.tar")]
    with pytest.raises(SystemExit) as info:
        main([root, str(tmp_path / "o"), "--prefix", ""])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: argument --prefix: must be a plain file-name prefix")
