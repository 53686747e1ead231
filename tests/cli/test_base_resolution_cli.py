"""A base saved at 224 trains a new model at 192 and at 256 from the command line: its position
embedding is resampled to the new grid, the new model's sin-cos table is built for it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_class_folders

from tec_fast import BaseModel, ViTConfig
from tec_fast.cli.train import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    write_class_folders(root / "data", ("a", "b"), 3, (260, 300), np.random.default_rng(0))
    torch.manual_seed(0)
    base = BaseModel(ViTConfig(img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2))
    base.pos_embed.data.normal_()  # a learned table, so resampling matters
    torch.save({"model": base.state_dict()}, root / "base224.pth")
    return root


@pytest.mark.parametrize("size", [192, 256])
def test_a_224_base_trains_at_another_size(files, size, tmp_path):
    out = tmp_path / "run"
    code = main(["--data", str(files / "data"), "--base", f"timm:{files / 'base224.pth'}", "--base-heads", "2",
                 "--img-size", str(size),
                 "--decoder-dim", "16", "--decoder-depth", "1", "--decoder-heads", "2", "--topk", "3",
                 "--batch-size", "2", "--max-steps", "2", "--output", str(out), "--no-progress", "--seed", "0"])
    assert code == 0
    enc = BaseModel.from_checkpoint(str(out / "encoder_timm.pth"), num_heads=2)
    assert enc.config.img_size == size and enc.pos_embed.shape[1] == 1 + (size // 16) ** 2


def _base_flags(path, **extra):
    from tec_fast.cli.train import build_parser

    args = build_parser().parse_args(["--data", ".", "--base", f"timm:{path}", "--img-size", "224"])
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def test_a_base_of_no_presets_size_warns_of_its_guessed_heads(files):
    """Weights of a width no preset has (32) store no head count: it is guessed (32/64 -> 1) with a
    warning that names --base-heads; with --base-heads the base has that count and nothing is said."""
    from tec_fast.training.builders import base_architecture

    with pytest.warns(UserWarning, match=r"assuming 1 head \(width/64\).*--base-heads N"):
        assert base_architecture(_base_flags(files / "base224.pth")).num_heads == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert base_architecture(_base_flags(files / "base224.pth", base_heads=2)).num_heads == 2
    with pytest.raises(ValueError, match=r"^--base-heads 3 heads do not fit the weights"):
        base_architecture(_base_flags(files / "base224.pth", base_heads=3))


@pytest.mark.parametrize("extra, needle", [
    (["--base-heads", "3"], "argument --base-heads: 3 heads do not fit the weights"),
    (["--base-heads", "2", "--base-model", "vit_base_patch16"],
     "argument --base-heads: --base-model vit_base_patch16 sets the base's head count already (12)"),
])
def test_base_heads_refusals(files, capsys, extra, needle):
    with pytest.raises(SystemExit) as info:
        main(["--data", str(files / "data"), "--base", f"timm:{files / 'base224.pth'}", "--decoder-dim", "16",
              "--decoder-depth", "1", "--decoder-heads", "2", "--topk", "3", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and needle in err[0], err
