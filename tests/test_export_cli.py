"""``python -m tec_fast.export`` formats: timm (token pool), timm with global_pool='avg'
(``fc_norm``), safetensors output, and a Hugging Face ViTModel folder; each loads back as a base."""
from __future__ import annotations

import json

import pytest
import torch

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast.checkpoint import read_checkpoint
from tec_fast.cli.export import main

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    cfg = TECConfig(encoder=VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2, num_adapters=1)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": TECModel(cfg).state_dict(), "model_config": cfg.to_dict()}, path)
    return path


def test_formats(tmp_path, ckpt, capsys):
    assert main([str(ckpt), str(tmp_path / "enc.pth")]) == 0
    token = read_checkpoint(str(tmp_path / "enc.pth"))
    assert "norm.weight" in token and "fc_norm.weight" not in token
    assert main([str(ckpt), str(tmp_path / "enc_avg.safetensors"), "--format", "timm-avg"]) == 0
    avg = BaseModel.from_checkpoint(str(tmp_path / "enc_avg.safetensors"), num_heads=2)
    assert avg.config.embed_dim == 32
    assert main([str(ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 3
    hf = BaseModel.from_checkpoint(str(tmp_path / "hf"))
    base = BaseModel.from_checkpoint(str(tmp_path / "enc.pth"), num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(hf.encode(x), base.encode(x), atol=1e-5, rtol=1e-5)
    assert "wrote" in capsys.readouterr().out


def test_hf_needs_an_empty_folder(tmp_path, ckpt, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit) as e:
        main([str(ckpt), str(tmp_path / "full"), "--format", "hf"])
    assert e.value.code == 2 and "new or empty folder" in capsys.readouterr().err
