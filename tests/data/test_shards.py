"""Tar shards: brace patterns, the same samples as the folder they were written from, corrupt
and cut-short members skipped and counted, the split across ranks and workers, the make_shards
command, and training from shards that resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import tarfile
import warnings

import pytest
import torch

from data_helpers import write_folder
from tec_fast.data.folder import ImageFolderDataset
from tec_fast.data.shards import TarShardDataset, expand_braces, shard_paths, write_shards
from tec_fast.data.sources import data_kind, open_dataset
from tec_fast.training import FitConfig, TrainingInterrupted, fit
from tec_fast.training.distributed import DistInfo
from tec_fast.training.loop import build_loader


def test_expand_braces():
    assert expand_braces("s-{00..02}.tar") == ["s-00.tar", "s-01.tar", "s-02.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar",
                                                   "b/x-8.tar", "b/x-9.tar", "b/x-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="backwards"):
        expand_braces("s-{3..1}.tar")
    with pytest.raises(ValueError, match="neither a range"):
        expand_braces("s-{x}.tar")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("folder") / "train", n=14, png_every=5)
    out = tmp_path_factory.mktemp("shards")
    info = write_shards(os.path.dirname(root), str(out), max_images=4)
    return root, str(out), info


def test_written_shards_hold_the_folder(made):
    root, out, info = made
    assert info["images"] == 14 and len(info["shards"]) == 4 and info["classes"] == ["cat", "dog"]
    assert info["pattern"] == os.path.join(out, "shard-{000000..000003}.tar")
    assert shard_paths(info["pattern"]) == info["shards"] == shard_paths(out)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert data_kind(info["pattern"]) == data_kind(out) == "shards" and data_kind(root) == "folder"
    folder = ImageFolderDataset(root, img_size=16, train=True, uint8=True)
    for spec in (info["pattern"], out, info["shards"]):
        ds = TarShardDataset(spec, img_size=16, train=True, uint8=True)
        assert len(ds) == 14 and ds.classes == ["cat", "dog"] and ds.targets == folder.targets
        for i in (0, 4, 13):  # a PNG is at 4 and 9
            torch.manual_seed(i)
            a, la = ds[i]
            torch.manual_seed(i)
            b, lb = folder[i]
            assert torch.equal(a, b) and la == lb
    ev = open_dataset(out, img_size=16, train=False)
    ref = ImageFolderDataset(root, img_size=16, train=False)
    assert torch.equal(ev[3][0], ref[3][0]) and ev[3][0].dtype == torch.float32


def test_a_flat_image_folder_with_an_archive_is_a_folder(tmp_path):
    write_folder(tmp_path / "flat", n=2, classes=(".",))
    (tmp_path / "flat" / "backup.tar").write_bytes(b"")
    assert data_kind(str(tmp_path / "flat")) == "folder"


def test_missing_shards_and_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="do not exist"):
        shard_paths(str(tmp_path / "s-{0..3}.tar"))
    with pytest.raises(ValueError, match=r"no \.tar shards"):
        shard_paths(str(tmp_path))
    (tmp_path / "x.tar").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        TarShardDataset(str(tmp_path / "x.tar"))


def _tar(path, members):
    import io
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_corrupt_members_skipped_and_counted(made, tmp_path):
    root, _, _ = made
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if f.endswith(".jpg"))
    good = [open(f, "rb").read() for f in files[:3]]
    _tar(tmp_path / "a.tar", [("k0.jpg", good[0]), ("k0.cls", b"1"), ("k1.jpg", b"garbage"), ("k1.cls", b"0"),
                              ("k2.jpg", good[1][: len(good[1]) // 2]), ("k3.jpg", good[2]), ("k3.cls", b"1"),
                              ("notes.txt", b"no image here")])
    with pytest.warns(RuntimeWarning, match=r"a\.tar: 1 keys \(first: 'notes'\) have no member with an image"):
        ds = TarShardDataset(str(tmp_path / "a.tar"), img_size=8, train=False)
    assert len(ds) == 4 and ds.targets == [1, 0, -1, 1] and ds.classes == []
    with pytest.warns(RuntimeWarning) as caught:
        x, label = ds[1]
    assert x.shape == (3, 8, 8) and label == 1  # k1 garbage, k2 cut short: k3 stands in
    assert [str(w.message).split()[3] for w in caught] == [f"{tmp_path}/a.tar:k1", f"{tmp_path}/a.tar:k2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad members are not decoded or warned about again
        assert ds[2][1] == 1
    assert ds.num_skipped == 2 and sorted(ds.skipped_paths()) == [f"{tmp_path}/a.tar:k1", f"{tmp_path}/a.tar:k2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = torch.utils.data.DataLoader(TarShardDataset(str(tmp_path / "a.tar"), img_size=8), batch_size=2,
                                             num_workers=2)
        assert sum(len(b[0]) for b in loader) == 4
    assert loader.dataset.num_skipped == 2  # counted in the workers, seen here


def test_cut_short_shard_keeps_what_came_before(made, tmp_path):
    _, _, info = made
    data = open(info["shards"][0], "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = TarShardDataset(str(tmp_path / "cut.tar"), img_size=8)
        assert 1 <= len(ds) < 4
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == len(ds)


def test_a_shard_cut_at_a_block_boundary_warns(made, tmp_path):
    """Cut exactly before a member's header (a copy that stopped on a 512-byte block), a tar
    parses as a shorter valid one but for its missing end-of-archive blocks: a warning says so,
    as for a cut inside a member (it lost samples silently)."""
    from tec_fast.data.shards import index_shard
    _, _, info = made
    src = info["shards"][0]
    headers = [m.offset for m in tarfile.open(src).getmembers()]
    cut = headers[len(headers) // 2]
    assert cut % 512 == 0
    (tmp_path / "cut.tar").write_bytes(open(src, "rb").read()[:cut])
    with pytest.warns(RuntimeWarning, match=r"cut.tar is unreadable after \d+ keys \(no end-of-archive blocks"):
        kept = index_shard(str(tmp_path / "cut.tar"))
    assert 1 <= len(kept) < len(index_shard(src))


def test_split_across_ranks_and_workers_is_deterministic(made):
    _, out, _ = made
    ds = TarShardDataset(out, img_size=8, uint8=True)
    cfg = FitConfig(name="t", output_dir="", batch_size=2, seed=5)
    seen = []
    for rank in (0, 1):
        per_workers = []
        for workers in (0, 2):
            cfg.num_workers = workers
            loader, sampler, _ = build_loader(ds, cfg, DistInfo(rank=rank, world=2))
            sampler.set_epoch(1)
            per_workers.append([(x, y) for x, y in loader])
        for (xa, ya), (xb, yb) in zip(*per_workers):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)  # worker count changes nothing
        assert per_workers[0][0][0].dtype == torch.uint8
        seen.append(list(sampler))
    ids = [i for rank in seen for i, _ in rank]
    assert len(ids) == len(set(ids)) == 12  # disjoint: 7 per rank, 3 whole batches of 2 each


def test_make_shards_command(made, tmp_path, capsys):
    from tec_fast.cli.make_shards import main

    root, _, _ = made
    assert main([os.path.dirname(root), str(tmp_path / "o"), "--max-images", "5", "--prefix", "part",
                 "--no-progress"]) == 0
    record = json.loads((tmp_path / "o" / "shards.json").read_text())
    assert record["shards"] == 3 and record["images"] == 14 and record["pattern"].endswith("part-{000000..000002}.tar")
    assert "--data" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), str(tmp_path / "o2")])
    assert exit_info.value.code == 2 and "error: argument SRC" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([os.path.dirname(root), str(tmp_path / "o3"), "--prefix", "a/b"])
    assert exit_info.value.code == 2 and "error: argument --prefix" in capsys.readouterr().err


# ------------------------------------------------------------------- training, resumed
def _cfg(out, **kw):
    base = dict(name="tec", output_dir=str(out), epochs=2, batch_size=2, accum=2, lr=2e-3, warmup_steps=2,
                seed=7, log_every=1, progress=False)
    base.update(kw)
    return FitConfig(**base)


def resumes_exactly(tmp_path, make_dataset):
    """fit on ``make_dataset()`` (uint8 images, 16 px) interrupted at step 2 and resumed with two
    workers equals the uninterrupted run, loss for loss and weight for weight."""
    from train_helpers import tiny_objective, tiny_tec

    full = fit(tiny_tec(), tiny_objective(), make_dataset(), _cfg(tmp_path / "full"))

    def stop(step, metrics):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny_tec(), tiny_objective(), make_dataset(), _cfg(tmp_path / "cut"), on_step=stop)
    part1 = torch.load(info.value.checkpoint, weights_only=True)
    assert part1["step"] == 2 and part1["step_in_epoch"] == 2  # mid-epoch (14 images: 3 steps of 4)
    resumed = fit(tiny_tec(seed=99), tiny_objective(), make_dataset(),
                  _cfg(tmp_path / "cut", resume="auto", num_workers=2))
    assert [full.losses[i] for i in range(2)] + resumed.losses == full.losses
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_training_from_shards_resumes_exactly(made, tmp_path):
    _, out, _ = made
    resumes_exactly(tmp_path, lambda: TarShardDataset(out, img_size=16, uint8=True))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_scan_matches_tarfile(tmp_path, fmt):
    import io

    from tec_fast.data.shards import scan_tar
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        names = ["a" * 90 + "/k1.jpg", "k1.cls", "d/k2.png"]
        if fmt != tarfile.USTAR_FORMAT:
            names += ["b" * 120 + "/" + "c" * 120 + ".jpg", "d/\u00e9t\u00e9.jpg"]  # long and non-ASCII names
        for i, name in enumerate(names):
            data = bytes([i]) * (700 * i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        sub = tarfile.TarInfo("d")
        sub.type = tarfile.DIRTYPE
        tf.addfile(sub)
    with tarfile.open(path) as tf:
        ref = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    got = list(scan_tar(str(path)))
    assert [g[:3] for g in got] == ref
    assert got[0][3] == b"\x00" and got[1][3] is None  # members of <= 512 bytes come with their data


MAE_ARCH = ["--objective", "mae", "--model", "vit_demo_patch4", "--img-size", "32", "--decoder-dim", "32",
            "--decoder-depth", "1", "--decoder-heads", "2"]


def test_train_command_reads_shard_patterns(made, tmp_path, capsys):
    from tec_fast.cli.train import main

    _, _, info = made
    assert main(["--data", info["pattern"], *MAE_ARCH, "--max-steps", "2", "--batch-size", "4", "--num-workers", "0",
                 "--warmup-epochs", "0", "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "data: 14 images, tar shards" in out and "2 / 2" in out
    missing = info["pattern"].replace("000003", "000009")
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", missing, *MAE_ARCH])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "do not exist" in err[0]


def test_a_brace_pattern_is_counted_before_it_is_expanded():
    """--data 'dir/shard-{0..99999999999}.tar' once built the whole list (gigabytes, or no end)."""
    import time

    from tec_fast.data.shards import MAX_BRACE_NAMES, brace_count, expand_braces
    assert brace_count("s-{00..09}-{a,b,c}.tar") == 30 == len(expand_braces("s-{00..09}-{a,b,c}.tar"))
    assert brace_count("plain.tar") == 1
    t = time.perf_counter()
    with pytest.raises(ValueError, match=r"'d/shard-\{0\.\.99999999999\}\.tar' expands to 100000000000 names, "
                                         rf"more than the {MAX_BRACE_NAMES} allowed"):
        expand_braces("d/shard-{0..99999999999}.tar")
    with pytest.raises(ValueError, match="expands to 1000000000 names"):  # the groups multiply
        expand_braces("d/{0..999999}-{0..999}.tar")
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_headers_over_one_block_are_read_whole(tmp_path, fmt):
    """A GNU long name or a pax record block of more than 512 bytes (deep paths; GNU tar
    --format=pax --xattrs) was read from 512 bytes past its start: the members lost their names,
    and a shard of such names gave no sample, without a word."""
    import io

    from tec_fast.data.shards import index_shard, scan_tar
    path = tmp_path / "t.tar"
    deep = "/".join(["e" * 100] * 6)  # a name of more than 512 bytes
    with tarfile.open(path, "w", format=fmt) as tf:
        for i in range(3):
            for ext, data in (("jpg", bytes(700)), ("cls", b"1")):
                info = tarfile.TarInfo(f"{deep}/{i:03d}.{ext}")
                info.size = len(data)
                # pax: the path record alone, after 600 bytes of another record, or before them
                info.pax_headers = [{}, {"comment": "x" * 600}, {"path": info.name, "comment": "x" * 600}][i]
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        ref = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    assert [g[:3] for g in scan_tar(str(path))] == ref
    assert [(key, label) for key, _, label in index_shard(str(path))] == [(f"{deep}/{i:03d}", "1") for i in range(3)]


def _copy_shards(info, folder):
    os.makedirs(folder)
    for p in info["shards"]:
        os.link(p, os.path.join(folder, os.path.basename(p)))
    return str(folder)


def test_keys_without_an_image_member_are_named(made, tmp_path):
    """Keys whose members have no image extension (``000.input.jpg``, a GIF) were left out
    without a word; the warning also reaches the caller when a pool of processes reads the
    headers (a worker's own warnings did not)."""
    _, _, info = made
    folder = _copy_shards(info, tmp_path / "sh")
    jpg = tarfile.open(info["shards"][0]).extractfile("000000000.jpg").read()
    _tar(os.path.join(folder, "x-1.tar"), [(f"{i:03d}.{ext}", data) for i in range(4)
                                           for ext, data in (("input.jpg", jpg), ("cls", b"1"))])
    _tar(os.path.join(folder, "x-2.tar"), [("a.gif", b"GIF89a"), ("b.gif", b"GIF89a")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = TarShardDataset(folder, img_size=8, processes=2)
    assert len(ds) == 14  # the four shards written from the folder
    assert [str(w.message) for w in caught] == [
        f"tar shard {folder}/x-1.tar: 4 keys (first: '000') have no member with an image extension (jpg, jpeg, "
        "png, webp, ppm, pgm, bmp, tif, tiff; theirs: cls, gif, input.jpg) and are left out, and 2 more in 1 "
        "other shards"]


def test_a_shard_cut_inside_its_first_member_keeps_the_others(made, tmp_path):
    """A shard cut inside its first member refused the whole shard set (as a file that is no tar
    does); it now loses its own members only, with a warning naming it."""
    _, _, info = made
    folder = tmp_path / "cut"
    _copy_shards(info, folder)
    last = info["shards"][-1]
    first = tarfile.open(last).getmembers()[0]
    cut = folder / os.path.basename(last)
    data = open(last, "rb").read()[: first.offset_data + first.size // 2]
    cut.unlink()
    cut.write_bytes(data)
    with pytest.warns(RuntimeWarning, match=rf"tar shard {cut} is unreadable after 0 keys \(member "
                                            rf"'{first.name}' is cut short\)"):
        ds = TarShardDataset(str(folder), img_size=8, processes=2)
    assert len(ds) == 12  # 4 + 4 + 4, the cut shard's 2 lost
    with pytest.raises(ValueError, match="no images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TarShardDataset(str(cut), img_size=8)  # nothing left: refused all the same


def test_a_shard_folder_with_subfolders(made, tmp_path):
    """Any subfolder made a folder of shards an image folder: its .tar files went unread (an
    empty logs/ folder: 'no images'). Beside a folder of images (ImageNet's folders beside its
    download archives) it is an image folder, and a warning names the .tar files left unread."""
    _, _, info = made
    folder = _copy_shards(info, tmp_path / "sh")
    os.makedirs(os.path.join(folder, "logs", "old"))
    assert data_kind(folder) == "shards" and len(open_dataset(folder, img_size=8)) == 14
    write_folder(os.path.join(folder, "val"), n=1)
    with pytest.warns(RuntimeWarning, match=r"sh' holds folders of images \(val\) and 4 \.tar files \(shard-000000"
                                            r"\.tar, shard-000001\.tar, shard-000002\.tar, \.\.\.\): read as an image "
                                            r"folder, the \.tar files left unread"):
        assert data_kind(folder) == "folder"


def test_a_folder_of_several_prefixes_is_refused_as_data(made, tmp_path):
    """Two make_shards prefixes in one folder were read as one data set; the folder is refused,
    naming each prefix's pattern."""
    root, _, _ = made
    out = str(tmp_path / "out")
    write_shards(os.path.dirname(root), out, prefix="a", max_images=5)
    write_shards(os.path.dirname(root), out, prefix="b", max_images=14)
    with pytest.raises(ValueError, match=rf"the folder '{out}' holds the shards of 2 prefixes \(a, b\): give one of "
                                         rf"them as a pattern: '{out}/a-\{{000000\.\.000002\}}\.tar', "
                                         rf"'{out}/b-000000\.tar'"):
        shard_paths(out)
    assert len(TarShardDataset(os.path.join(out, "a-{000000..000002}.tar"), img_size=8)) == 14


def test_a_key_with_two_images_or_two_labels_reads_the_first_of_each_kind(tmp_path):
    """The image member read is the first extension of IMAGE_EXTS the key has (jpg before png),
    whatever the order in the tar; the label is the first label member met."""
    import io

    from PIL import Image

    def encoded(colour, fmt):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buf, format=fmt)
        return buf.getvalue()

    _tar(tmp_path / "s.tar", [("k.png", encoded((255, 0, 0), "PNG")), ("k.jpg", encoded((0, 0, 255), "JPEG")),
                              ("k.cls", b"1"), ("k.label", b"2")])
    ds = TarShardDataset(str(tmp_path / "s.tar"), img_size=8, train=False)
    assert len(ds) == 1 and ds.targets == [1]
    pixel = ds[0][0][:, 4, 4].tolist()  # normalised: pure blue is about (-2.1, -2.0, +2.6)
    assert pixel[2] > 2 and pixel[0] < -1.5, pixel  # blue: the JPEG
