"""Checkpoint layouts at their edges: wrapper prefixes stripped by name however they are stacked
(DDP ``module.``, ``backbone.``, torch.compile's ``_orig_mod.``), a state dict beside as many
stray entries as tensors, shape contradictions refused naming key and shapes even where the
element counts agree, block counts that disagree with the configured depth (gaps in the block
indices included), and config overrides that name no ViTConfig field."""
from __future__ import annotations

import pytest
import torch

from tec_fast import BaseModel, ViTConfig
from tec_fast.checkpoint import read_state_dict

VIT = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture()
def state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in BaseModel(VIT, topk=None).state_dict().items()}


def _loads_same(state, loaded):
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_compiled_model_prefix_is_stripped(state):
    assert read_state_dict({"model": {"_orig_mod.cls_token": state["cls_token"]}}) == {"cls_token": state["cls_token"]}
    b = BaseModel(VIT, topk=None)
    b.load_checkpoint({"model": {"_orig_mod." + k: v for k, v in state.items()}})
    _loads_same(state, b)


@pytest.mark.parametrize("prefix", ["backbone.module.", "_orig_mod.module.", "module.backbone.", "module._orig_mod."])
def test_stacked_prefixes_are_stripped_in_any_order(state, prefix):
    t = state["cls_token"]
    assert read_state_dict({prefix + "cls_token": t}) == {"cls_token": t}
    b = BaseModel(VIT, topk=None)
    b.load_checkpoint({"state_dict": {prefix + k: v for k, v in state.items()}})
    _loads_same(state, b)


@pytest.mark.parametrize("key, make, stored, want", [
    ("blocks.0.mlp.fc1.weight", lambda v: v.t().contiguous(), (32, 128), (128, 32)),
    ("cls_token", lambda v: v.reshape(32), (32,), (1, 1, 32)),
])
def test_shape_contradiction_with_the_same_element_count_is_refused(state, key, make, stored, want):
    state[key] = make(state[key])
    with pytest.raises(ValueError, match=rf"^checkpoint <dict>: key '{key}' has shape {stored} but the configured "
                                         rf"model expects {want}$".replace("(", r"\(").replace(")", r"\)")):
        BaseModel(VIT, topk=None).load_checkpoint(state)


def test_fewer_blocks_than_the_configured_depth_names_both(state):
    fewer = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"^checkpoint has 1 encoder blocks \(blocks\.0\.\.0\) but the configured "
                                         r"base model has depth=2$"):
        BaseModel(VIT, topk=None).load_checkpoint(fewer)


def test_block_count_is_one_past_the_highest_index():
    from tec_fast.checkpoint import count_blocks
    one = torch.zeros(1)
    assert count_blocks({"blocks.0.a": one, "blocks.2.a": one, "cls_token": one}) == 3
    assert count_blocks({"decoder_blocks.4.a": one, "blocks.0.a": one}, "decoder_blocks.") == 5
    assert count_blocks({"cls_token": one}) == 0


def test_a_gap_in_the_block_indices_is_a_depth_contradiction(state):
    gap = {k.replace("blocks.1.", "blocks.2."): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"^checkpoint has 3 encoder blocks \(blocks\.0\.\.2\) but the configured "
                                         r"base model has depth=2$"):
        BaseModel(VIT, topk=None).load_checkpoint(gap)


def test_a_state_dict_beside_as_many_stray_entries_names_the_first(state):
    t = state["cls_token"]
    with pytest.raises(ValueError, match=r"^checkpoint holds 1 tensors beside 1 other value\(s\) \('epoch': int\); "
                                         r"a state dict holds tensors only: remove 'epoch'$"):
        read_state_dict({"cls_token": t, "epoch": 3})
    with pytest.raises(ValueError, match=r"^checkpoint holds 2 tensors under 'model' beside 2 other value\(s\) "
                                         r"\('epoch': int, 'step': int\); a state dict holds tensors only: remove 'epoch'$"):
        read_state_dict({"model": {"cls_token": t, "pos_embed": t, "epoch": 3, "step": 7}})


def test_an_unknown_config_override_is_refused_naming_it(state):
    with pytest.raises(ValueError, match=r"^config_overrides: 'ln_epsilon' is not a ViTConfig field \(img_size, "):
        BaseModel.from_checkpoint(state, config_overrides={"ln_epsilon": 1e-5})


def test_two_keys_that_strip_to_one_name_are_refused(state):
    """``module.x`` beside ``x``: one silently replaced the other."""
    t = state["cls_token"]
    with pytest.raises(ValueError, match=r"^checkpoint keys 'cls_token' and 'module\.cls_token' both name "
                                         r"'cls_token' once the wrapper prefixes module\., backbone\., _orig_mod\. "
                                         r"are stripped: keep one of them$"):
        read_state_dict({"cls_token": t, "module.cls_token": t + 1})
    doubled = dict(state, **{"backbone.module.pos_embed": state["pos_embed"]})
    with pytest.raises(ValueError, match=r"'pos_embed' and 'backbone\.module\.pos_embed' both name 'pos_embed'"):
        BaseModel(VIT, topk=None).load_checkpoint(doubled)
