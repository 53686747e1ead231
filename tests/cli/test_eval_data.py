"""``python -m tec_fast.eval`` on folders with unreadable images: left out of the features and
the counts (not replaced), reported in the summary and the JSON, ``--strict-data``; the class
folders that differ; the k actually used; top-1 of the protocols without the unreadable ones."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tec_fast import ViTConfig
from tec_fast.cli.eval import cli, main
from tec_fast.models.mae import MAEModel

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mae.pth"
    torch.save({"model": MAEModel(VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2).state_dict()}, path)
    return str(path)


def _folder(root, classes=("blue", "red"), val_classes=None, n=3):
    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(40, 48, 3), dtype=np.uint8)
                arr[..., 0 if c == "red" else 2] += 180
                Image.fromarray(arr).save(d / f"{i}.jpg")
    return root


def test_unreadable_val_images_are_left_out_and_reported(tmp_path, ckpt, capsys):
    data = _folder(tmp_path / "data")
    (data / "val" / "red" / "8.jpg").write_bytes(b"")
    (data / "val" / "red" / "9.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "r.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = main([ckpt, "--num-heads", "2", "--data", str(data), "--workers", "1", "--quiet", "--json", str(out)])
    bad = [str(data / "val" / "red" / "8.jpg"), str(data / "val" / "red" / "9.jpg")]
    assert res["data"]["train"] == 6 and res["data"]["test"] == 6  # the readable ones: none counted twice
    assert res["data"]["skipped"] == {"train": 0, "test": 2}
    assert res["data"]["skipped_files"] == {"train": [], "test": bad}
    assert json.loads(out.read_text())["data"] == res["data"]
    text = capsys.readouterr().out
    assert "6 train / 6 test images" in text and f"unreadable images: 2 of test left out ({', '.join(bad)})" in text
    assert res["k"] == 6 and res["k_requested"] == 20 and "k=6 (--k 20 cut to the 6 training images)" in text


def test_strict_data_stops_at_the_unreadable_file(tmp_path, ckpt, capsys):
    data = _folder(tmp_path / "data")
    (data / "val" / "blue" / "7.jpg").write_bytes(b"")
    assert cli([ckpt, "--num-heads", "2", "--data", str(data), "--workers", "0", "--quiet", "--strict-data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the encoder and load lines
    assert err.startswith("error: unreadable image ") and "7.jpg" in err and "empty file" in err
    with pytest.raises(SystemExit) as info:
        main([ckpt, "--num-heads", "2", "--quiet", "--strict-data"])  # the demo: nothing to read
    assert info.value.code == 2 and "argument --strict-data" in capsys.readouterr().err


def test_different_class_folders_are_named(tmp_path, ckpt):
    data = _folder(tmp_path / "data", classes=("blue", "red"), val_classes=("blue", "green"), n=1)
    with pytest.raises(ValueError, match=r"^--data: .*only in train/: red; only in val/: green"):  # exit 2
        main([ckpt, "--num-heads", "2", "--data", str(data), "--workers", "0", "--quiet"])


def test_protocol_top1_leaves_unreadable_items_out():
    from tec_fast.evaluation.protocol import top1, top1_counts

    class Items(torch.utils.data.Dataset):  # 4 items, 1 unreadable: 2 of the 3 readable right
        labels = [0, 1, None, 1]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            y = self.labels[i]
            return None if y is None else (torch.full((2,), float(i)), y)

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        model.bias.copy_(torch.tensor([0.5, 0.0]))  # predicts 0 for x = 0, else 1
    assert top1_counts(model, Items(), batch_size=2) == (3, 3)
    Items.labels = [1, 1, None, 1]
    assert top1_counts(model, Items(), batch_size=3) == (2, 3) and top1(model, Items(), batch_size=3) == 2 / 3


def test_a_split_with_no_readable_image_names_its_folder(tmp_path, ckpt, capsys):
    data = _folder(tmp_path / "data", n=1)
    for name in ("blue", "red"):
        (data / "val" / name / "0.jpg").write_bytes(b"")
    assert cli([ckpt, "--num-heads", "2", "--data", str(data), "--workers", "0", "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: none of the 2 images under {str(data / 'val')!r} is readable: no features to evaluate"


def test_a_class_with_no_readable_training_image_is_counted_and_named(tmp_path, ckpt, capsys):
    """Its test images can never be predicted: the summary and the JSON say so, and it counts as a class."""
    data = _folder(tmp_path / "data", classes=("blue", "red", "zebra"), n=2)
    for f in (data / "train" / "zebra").iterdir():
        f.write_bytes(b"")
    out = tmp_path / "r.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = main([ckpt, "--num-heads", "2", "--data", str(data), "--workers", "0", "--quiet", "--json", str(out)])
    assert res["data"]["classes"] == 3 and res["data"]["train"] == 4 and res["data"]["test"] == 6
    assert res["data"]["classes_without_train_images"] == ["zebra"]
    assert res["data"]["test_images_of_those_classes"] == 2
    assert json.loads(out.read_text())["data"] == res["data"]
    text = capsys.readouterr().out
    assert "4 train / 6 test images, 3 classes" in text
    assert ("warning: class zebra has no readable training image: k-NN and the probe never predict it, so 2 test "
            "images count as wrong") in text
