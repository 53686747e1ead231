"""From the train command's flags to the model and objective: MAE's decoder defaults and export
name, and TEC's decoder / adapter / relation / masking flags and the base's width and heads as
the prediction sizes."""
from __future__ import annotations

import pytest
import torch

from tec_fast import BaseModel, ViTConfig
from tec_fast.cli.train import build_parser
from tec_fast.training.builders import build_mae, build_tec

CPU = torch.device("cpu")


def _flags(*argv):
    return build_parser().parse_args(["--data", ".", *argv])


def test_mae_decoder_defaults_to_8_blocks_and_takes_the_head_flag():
    flags = _flags("--objective", "mae", "--model", "vit_demo_patch4", "--img-size", "16",
                   "--decoder-dim", "32", "--decoder-heads", "2")
    setup = build_mae(flags, [], CPU, None)
    model = setup.model
    assert len(model.decoder_blocks) == 8
    assert model.decoder_embed.weight.shape == (32, 128)
    assert [b.attn.num_heads for b in model.decoder_blocks] == [2] * 8
    assert setup.encoder_file == "encoder_mae.pth" and setup.checkpoint_extra["kind"] == "mae"
    assert setup.objective.mask_ratio == flags.mask_ratio and setup.objective.noise_columns == 16


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """A base of a size no preset has (width 48, 3 heads) with LayerScale."""
    torch.manual_seed(0)
    base = BaseModel(ViTConfig(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3, layer_scale=True))
    path = tmp_path_factory.mktemp("base") / "base.pth"
    torch.save({"model": base.state_dict()}, path)
    return str(path)


def _tec(base_file, *argv):
    flags = _flags("--base", f"timm:{base_file}", "--base-heads", "3", "--img-size", "16",
                   "--decoder-dim", "16", "--decoder-heads", "2", *argv)
    return build_tec(flags, [], CPU, None)


def test_tec_defaults_two_decoder_blocks_and_predicts_the_base_width(base_file):
    setup = _tec(base_file, "--model", "vit_demo_patch4", "--topk", "3")
    cfg = setup.model.config
    assert cfg.decoder_depth == 2 and cfg.encoder.embed_dim == 128
    assert (cfg.pred_dim, cfg.pred_heads) == (48, 3)  # the base's width and heads, not the new model's
    assert cfg.input_adapter and cfg.relation
    assert setup.checkpoint_extra["base"]["topk"] == 3


def test_tec_flags_reach_the_model_and_objective(base_file):
    setup = _tec(base_file, "--tau", "0.5", "--no-input-adapter", "--masking", "block", "--topk", "3")
    cfg = setup.model.config
    assert cfg.tau == 0.5 and setup.checkpoint_extra["base"]["tau"] == 0.5
    assert not cfg.input_adapter
    assert setup.objective.masking == "block" and setup.objective.noise_columns == 16 + 1


def test_tec_without_relation_asks_the_base_for_no_top_k(base_file):
    setup = _tec(base_file, "--no-relation")
    assert setup.checkpoint_extra["base"]["topk"] is None and not setup.model.config.relation
    assert setup.objective.base.topk is None


def test_tec_new_model_without_model_flag_is_a_plain_vit_of_the_base_size(base_file):
    setup = _tec(base_file)
    enc = setup.model.config.encoder
    assert (enc.patch_size, enc.embed_dim, enc.depth) == (4, 48, 2)
    assert not enc.layer_scale and enc.is_plain


def _native_flags(*argv):
    return _flags("--base", "timm:unread.pth", "--native-resolution", "--model", "vit_demo_patch4",
                  "--img-size", "32", "--topk", "4", *argv)


def test_native_token_budget_defaults_to_batch_size_whole_images_with_cls():
    from tec_fast.training.builders import native_plan

    plan = native_plan(_native_flags("--batch-size", "3"))
    assert plan == {"patch": 4, "max_patches": 64, "min_patches": 4, "tokens_per_batch": 3 * (64 + 1)}
    plan = native_plan(_native_flags("--batch-size", "3", "--max-patches", "20"))
    assert plan["max_patches"] == 20 and plan["tokens_per_batch"] == 63


def test_native_token_budget_must_hold_one_image_and_its_cls_token():
    from tec_fast.training.builders import native_plan

    with pytest.raises(ValueError, match="--tokens-per-batch 64 cannot hold one image"):
        native_plan(_native_flags("--tokens-per-batch", "64"))
    assert native_plan(_native_flags("--tokens-per-batch", "65"))["tokens_per_batch"] == 65
