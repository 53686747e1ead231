"""python -m tec_fast.export: an OUT that is the checkpoint itself is refused, the --img-size a
checkpoint without a position embedding needs must fit the patch grid, and the keys it reads
from a DDP-wrapped (``module.``) or bare MAE checkpoint."""
from __future__ import annotations

import pytest
import torch

from tec_fast import ViTConfig
from tec_fast.checkpoint import read_checkpoint
from tec_fast.cli.export import encoder_architecture, main
from tec_fast.models.mae import MAEModel

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture()
def mae():
    torch.manual_seed(0)
    model = MAEModel(VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_out_that_is_the_checkpoint_itself_is_refused(tmp_path, mae, capsys):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": mae.state_dict()}, path)
    before = path.read_bytes()
    with pytest.raises(SystemExit) as info:
        main([str(path), str(path)])
    assert info.value.code == 2 and "is the checkpoint being read" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_img_size_for_weights_without_position_embedding_must_fit_the_patch(mae):
    state = {k: v for k, v in mae.encoder_state_dict().items() if k != "pos_embed"}
    with pytest.raises(ValueError, match=r"--img-size 30 is not a multiple of the weights' patch size 8"):
        encoder_architecture(state, "enc.pth", img_size=30)
    vit, _, _ = encoder_architecture(state, "enc.pth", img_size=40)
    assert (vit.img_size, vit.patch_size, vit.embed_dim, vit.depth) == (40, 8, 32, 2)


def test_a_ddp_wrapped_mae_checkpoint_exports_its_encoder_keys(tmp_path, mae):
    """``module.`` prefixes (a DDP model's state dict) are removed whole: the release-layout export
    holds exactly the encoder's keys and values, final norm included."""
    path = tmp_path / "mae.pth"
    torch.save({"model": {"module." + k: v for k, v in mae.state_dict().items()}}, path)
    assert main([str(path), str(tmp_path / "enc.pth")]) == 0
    got = read_checkpoint(str(tmp_path / "enc.pth"))["model"]
    want = mae.encoder_state_dict()
    assert sorted(got) == sorted(want) and "norm.weight" in got and "norm.bias" in got
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_head_count_is_a_guess_unless_patch_width_and_depth_all_match_a_preset():
    """Patch 4 and width 128 are vit_demo_patch4's (4 heads) but its depth is 6: 2 blocks match no
    preset, so the head count is guessed as width / 64 = 2 (and --format hf would be refused)."""
    state = MAEModel(ViTConfig(img_size=16, patch_size=4, embed_dim=128, depth=2, num_heads=4),
                     decoder_dim=16, decoder_depth=1, decoder_heads=2).encoder_state_dict()
    vit, _, guessed = encoder_architecture(state, "enc.pth")
    assert guessed and vit.num_heads == 2
    vit, _, guessed = encoder_architecture(state, "enc.pth", num_heads=4)
    assert not guessed and vit.num_heads == 4
