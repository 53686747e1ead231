"""MAEModel's construction: MAE's ViT-B decoder recipe as the defaults, the mask token drawn as
MAE draws it, and the config record that rebuilds the model."""
from __future__ import annotations

import torch

from tec_fast import ViTConfig
from tec_fast.models.mae import MAEModel

VIT = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def test_default_decoder_is_maes_vit_b_recipe():
    """512 wide, 8 blocks, 16 heads, per-patch normalised pixel targets."""
    model = MAEModel(VIT)
    assert model.decoder_embed.weight.shape == (512, 32)
    assert len(model.decoder_blocks) == 8
    assert all(block.attn.num_heads == 16 for block in model.decoder_blocks)
    assert model.decoder_pos_embed.shape == (1, 1 + 16, 512)
    assert model.norm_pix_loss is True


def test_mask_token_starts_as_a_small_normal_draw():
    """MAE: torch.nn.init.normal_(mask_token, std=.02), not zeros."""
    torch.manual_seed(0)
    token = MAEModel(VIT, decoder_dim=512, decoder_depth=1, decoder_heads=16).mask_token.detach()
    assert token.shape == (1, 1, 512)
    assert 0.015 < token.std().item() < 0.025 and token.abs().max().item() < 0.2


def test_config_dict_records_each_decoder_size_under_its_name():
    model = MAEModel(VIT, decoder_dim=24, decoder_depth=3, decoder_heads=4, norm_pix_loss=False)
    record = model.config_dict()
    assert record == {"vit": VIT.to_dict(), "decoder_dim": 24, "decoder_depth": 3, "decoder_heads": 4,
                      "norm_pix_loss": False}
    rebuilt = MAEModel(ViTConfig.from_dict(record["vit"]),
                       **{k: v for k, v in record.items() if k != "vit"})
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert [b.attn.num_heads for b in rebuilt.decoder_blocks] == [4, 4, 4]
