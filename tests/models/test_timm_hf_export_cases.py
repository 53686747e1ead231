"""export_timm on encoders with DINOv2 registers and a CLIP pre-norm: every encoder tensor kept
under its timm name, and only the final norm renamed fc_norm for global_pool='avg'. export_hf_vit's
config.json sizes and flags, and what it refuses; save_export refuses non-finite weights."""
from __future__ import annotations

import json

import pytest
import torch

from tec_fast import BaseModel, ViTConfig
from tec_fast.checkpoint import export_hf_vit, export_timm, save_export


def _random(vit):
    torch.manual_seed(0)
    base = BaseModel(vit, topk=None)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return base


def test_register_tokens_are_exported():
    base = _random(ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, reg_tokens=2,
                             no_embed_class=True))
    sd = export_timm(base)
    assert torch.equal(sd["reg_token"], base.state_dict()["reg_token"]) and sd["reg_token"].shape == (1, 2, 32)
    assert set(sd) == set(base.state_dict())


def test_avg_pool_export_renames_only_the_final_norm():
    base = _random(ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, pre_norm=True,
                             patch_bias=False))
    state = base.state_dict()
    sd = export_timm(base, global_pool="avg")
    assert {"norm_pre.weight", "norm_pre.bias", "fc_norm.weight", "fc_norm.bias"} <= set(sd)
    assert not any(k.startswith(("norm.", "fc_norm_pre")) for k in sd)
    assert torch.equal(sd["norm_pre.weight"], state["norm_pre.weight"])
    assert torch.equal(sd["fc_norm.weight"], state["norm.weight"])
    assert set(sd) == {("fc_" + k if k.startswith("norm.") else k) for k in state}


def test_hf_config_holds_the_mlp_width_and_qkv_bias_of_the_encoder(tmp_path):
    vit = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=False)
    export_hf_vit(_random(vit), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["intermediate_size"] == 64 and cfg["qkv_bias"] is False
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (32, 2, 2)


def test_hf_export_refuses_an_encoder_without_class_token(tmp_path):
    vit = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, class_token=False)
    with pytest.raises(ValueError, match="no equivalent of ViTConfig class_token"):
        export_hf_vit(_random(vit), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hf_export_refuses_encoder_weights_it_has_no_name_for(tmp_path):
    vit = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    state = dict(_random(vit).state_dict())
    state["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(ValueError, match=r"no Hugging Face ViT name: \['blocks.0.attn.q_norm.weight'\]"):
        export_hf_vit(state, tmp_path / "hf", vit=vit)
    assert not (tmp_path / "hf").exists()


def test_save_export_refuses_non_finite_weights(tmp_path):
    state = {"cls_token": torch.zeros(1, 1, 4), "pos_embed": torch.tensor([[[0.0, float("inf")]]])}
    for name in ("enc.pth", "enc.safetensors"):
        with pytest.raises(ValueError, match="'pos_embed'.*non-finite"):
            save_export(state, tmp_path / name)
        assert not (tmp_path / name).exists()
