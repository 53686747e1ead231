"""make_shards into a folder that already holds shards: the stale ones are removed (a folder read
as --data holds one write), a prefix whose classes differ from the shared classes.txt refused;
compressed or non-tar files named in one message; the command's --prefix refusal and its
progress line; its errors name SRC or OUT (an empty SRC, an OUT that cannot be made, a file
error under either); unreadable and empty source files skipped and listed."""
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
    (out / "other-000005.tar").unlink()  # (its labels would keep the names: test_prefixes_share_one_class_list)
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
    err = capsys.readouterr().err  # not a terminal: whole lines, no carriage returns
    assert "\r" not in err and err.splitlines()[-1].startswith("6 images, ") and err.endswith(" img/s\n")
    assert main([root, str(tmp_path / "o"), "--max-images", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"removed {tmp_path / 'o' / 'shard-000002.tar'}" in out
    record = json.loads((tmp_path / "o" / "shards.json").read_text())
    assert record["removed"] == [str(tmp_path / "o" / "shard-000002.tar")]
    with pytest.raises(SystemExit) as info:
        main([root, str(tmp_path / "o"), "--prefix", ""])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: argument --prefix: must be a plain file-name prefix")


def test_a_failed_rewrite_leaves_the_earlier_shards(tmp_path):
    """The shards are renamed only once all are complete: a write that fails on its third image
    leaves the earlier write's shards as they were, and no temporary file."""
    root = write_folder(tmp_path / "src", n=6)
    out = tmp_path / "out"
    write_shards(root, str(out), max_images=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = write_folder(tmp_path / "other", n=6, seed=1)

    def disk_full(done):
        if done == 3:
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        write_shards(other, str(out), max_images=2, on_image=disk_full)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "shard-000007.tar.tmp").write_bytes(b"a killed write's")  # cleaned by the next write
    write_shards(root, str(out), max_images=2)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_max_bytes_counts_the_tar_headers(tmp_path):
    """Each shard file stays within max_bytes, headers and padding included (many small images:
    the headers are most of it); bytes reports the files, image_bytes the images."""
    root = write_folder(tmp_path / "src", n=40, size=(8, 8))
    r = write_shards(root, str(tmp_path / "out"), max_bytes=40 * 1024)
    sizes = [os.path.getsize(p) for p in r["shards"]]
    assert len(sizes) > 1 and max(sizes) <= 40 * 1024
    assert r["bytes"] == sum(sizes) and r["image_bytes"] < r["bytes"]
    assert sum(len(TarShardDataset(p, img_size=8)) for p in r["shards"]) == 40


def test_a_classes_txt_that_no_write_made_is_not_replaced(tmp_path):
    root = write_folder(tmp_path / "src", n=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "classes.txt").write_text("mine\n")
    with pytest.raises(ValueError, match="classes.txt' is not an earlier write's"):
        write_shards(root, str(out))
    assert (out / "classes.txt").read_text() == "mine\n" and sorted(os.listdir(out)) == ["classes.txt"]


def test_make_shards_refuses_an_out_inside_the_images(tmp_path, capsys):
    from tec_fast.cli.make_shards import main
    root = write_folder(tmp_path / "src", n=4)
    for out in (root, os.path.join(root, "cat", "shards")):
        with pytest.raises(SystemExit) as info:
            main([root, out])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and err.startswith("error: argument OUT:") and "inside the image folder" in err
    assert sorted(os.listdir(root)) == ["cat", "dog"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        main([root, str(tmp_path / "afile" / "sub")])
    assert "error: argument OUT:" in capsys.readouterr().err


def _refusal(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    return err.strip()


def test_make_shards_names_src_when_it_holds_no_images(tmp_path, capsys):
    """An empty SRC (or one whose only images sit in a hidden folder, which the write skips) is
    refused at parse time as ``argument SRC``, not as the internal ``write_shards: no images``."""
    from tec_fast.cli.make_shards import main
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / ".hidden").mkdir()
    (empty / ".hidden" / "a.jpg").write_bytes(b"x")
    (empty / "notes.txt").write_text("no image")
    err = _refusal(main, [str(empty), str(tmp_path / "out")], capsys)
    assert err.startswith("error: argument SRC: no images") and "write_shards" not in err
    assert not (tmp_path / "out").exists()  # refused before OUT is made
    root = write_folder(tmp_path / "deep", n=1)  # one image, below a class folder's subfolder: it counts
    os.makedirs(os.path.join(root, "cat", "sub"))
    os.rename(os.path.join(root, "cat", "img00.jpg"), os.path.join(root, "cat", "sub", "img00.jpg"))
    assert main([root, str(tmp_path / "o2"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "o2" / "shards.json").read_text())["images"] == 1


def test_make_shards_names_out_when_it_cannot_be_made(tmp_path, capsys):
    from tec_fast.cli.make_shards import main
    root = write_folder(tmp_path / "src", n=2)
    err = _refusal(main, [root, "/proc/tec_fast_no_such/x"], capsys)
    assert err.startswith("error: argument OUT: '/proc/tec_fast_no_such/x': cannot make the folder"), err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "classes.txt").write_text("mine\n")
    err = _refusal(main, [root, str(mine)], capsys)
    assert err.startswith("error: argument OUT:") and "not an earlier write's" in err and "write_shards" not in err
    assert (mine / "classes.txt").read_text() == "mine\n"


def test_make_shards_names_the_folder_of_a_file_error(tmp_path, capsys, monkeypatch):
    """A file the write cannot read (under SRC) or write (under OUT) ends in one line naming it."""
    from tec_fast.cli import make_shards
    from tec_fast.data import shards
    root = write_folder(tmp_path / "src", n=2)
    out = tmp_path / "out"
    link = os.path.join(root, "cat", "link.jpg")
    os.symlink("/nonexistent/x.jpg", link)  # SRC's, though it points elsewhere (its resolved path is not)
    for path, name in ((os.path.join(root, "cat", "x.jpg"), "SRC"), (link, "SRC"), (str(out / "x.tar"), "OUT")):

        def failing(*a, path=path, **k):
            raise PermissionError(13, "Permission denied", path)
        monkeypatch.setattr(shards, "write_shards", failing)
        assert make_shards.main([root, str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: argument {name}: Permission denied: {path!r}", err


def test_make_shards_skips_unreadable_files(tmp_path, capsys, monkeypatch):
    """One file that cannot be read (a broken link, no permission) ended the whole write, which
    has no resume, where the trainer skips the file; an empty file was copied as a sample. Both
    are skipped with a warning naming them, counted in the summary and listed in shards.json,
    whose pattern is absolute (it was relative to the working directory)."""
    from tec_fast.cli.make_shards import main
    write_folder(tmp_path / "src", n=4)
    os.symlink("/nonexistent/x.jpg", tmp_path / "src" / "cat" / "broken.jpg")
    (tmp_path / "src" / "dog" / "empty.jpg").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(RuntimeWarning) as caught:
        assert main(["src", "out", "--no-progress"]) == 0
    assert [str(w.message) for w in caught] == [
        "skipping unreadable image src/cat/broken.jpg: No such file or directory; not written to the shards",
        "skipping unreadable image src/dog/empty.jpg: empty file (0 bytes); not written to the shards"]
    record = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert record["images"] == 4 and record["pattern"] == str(tmp_path / "out" / "shard-000000.tar")
    assert record["skipped"] == {str(tmp_path / "src" / "cat" / "broken.jpg"): "No such file or directory",
                                 str(tmp_path / "src" / "dog" / "empty.jpg"): "empty file (0 bytes)"}
    out = capsys.readouterr().out
    assert "skipped     2 unreadable or empty (first: src/cat/broken.jpg; shards.json lists them all)" in out
    assert f"--data '{tmp_path / 'out' / 'shard-000000.tar'}'" in out
    assert len(TarShardDataset("out", img_size=8)) == 4
    for p in (tmp_path / "src").glob("*/img*.jpg"):
        p.write_bytes(b"")
    with pytest.warns(RuntimeWarning):
        assert main(["src", "out", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: write_shards: none of the 6 images in 'src' is readable (first: src/cat/broken.jpg")
    assert len(TarShardDataset("out", img_size=8)) == 4  # the earlier write is left as it was


def test_prefixes_share_one_class_list(tmp_path, capsys):
    """A second --prefix in the same OUT replaced the classes.txt that named the first one's
    labels (cat, dog read as bird); a write whose classes differ is refused, naming the file."""
    from tec_fast.cli.make_shards import main
    pets = write_folder(tmp_path / "pets", n=4)
    birds = write_folder(tmp_path / "birds", n=2, classes=("bird",))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(open(os.path.join(pets, "cat", "img00.jpg"), "rb").read())
    out = tmp_path / "out"
    assert main([pets, str(out), "--prefix", "a", "--no-progress"]) == 0
    capsys.readouterr()
    for src, theirs in ((birds, "bird"), (str(flat), "none")):
        assert main([src, str(out), "--prefix", "b", "--no-progress"]) == 2
        assert capsys.readouterr().err == (
            f"error: write_shards: '{out}/classes.txt' names the classes of the shards of prefix a there (cat, dog), "
            f"and '{src}' has others ({theirs}): the prefixes in a folder share its classes.txt; write prefix 'b' "
            f"into another folder\n")
    assert (out / "classes.txt").read_text() == "cat\ndog\n" and not list(out.glob("b-*"))
    assert main([pets, str(out), "--prefix", "b", "--no-progress"]) == 0  # the same classes: welcome
    assert main([birds, str(out), "--prefix", "a", "--no-progress"]) == 2  # b's labels would be renamed


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_make_shards_skips_a_named_pipe_with_an_image_name(tmp_path):
    """A named pipe called *.jpg waited for a writer forever (no progress, no error)."""
    import threading
    import warnings

    root = write_folder(tmp_path / "src", n=4)
    fifo = tmp_path / "src" / "cat" / "pipe.jpg"
    os.mkfifo(fifo)
    got = {}

    def write():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got["result"] = write_shards(root, str(tmp_path / "out"))
        got["warnings"] = [str(w.message) for w in caught]

    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("make_shards blocked on a named pipe")
    assert f"skipping unreadable image {fifo}: a named pipe, not an image file; not written to the shards" \
        in got["warnings"], got["warnings"]
    assert len(TarShardDataset(str(tmp_path / "out"), img_size=8)) == 4
