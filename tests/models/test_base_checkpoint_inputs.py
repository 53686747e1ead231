"""Inputs the base-model loaders refuse with a ValueError naming the argument or the key, instead
of loading them silently (NaN / inf, integer, bool or complex weights) or failing deep inside
(AttributeError, NotImplementedError, a misleading 'no state dict')."""
from __future__ import annotations

import pytest
import torch

from tec_fast import BaseModel, ViTConfig

VIT = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
KEY = "blocks.0.attn.qkv.weight"


@pytest.fixture()
def state():
    torch.manual_seed(0)
    return BaseModel(VIT, topk=None).state_dict()


def _with(state, key, value):
    return {**state, key: value}


def test_nonfinite_base_weights_are_refused_naming_the_key(state, tmp_path):
    bad = state[KEY].clone()
    bad[0, 0] = float("inf")
    path = tmp_path / "nan.pth"
    torch.save({"model": _with(state, KEY, bad)}, path)
    with pytest.raises(ValueError, match=rf"checkpoint {path}: 1 weights hold NaN or inf values \({KEY}\)"):
        BaseModel(VIT, topk=None).load_checkpoint(str(path))
    with pytest.raises(ValueError, match=rf"1 weights hold NaN or inf values \({KEY}\)"):
        BaseModel.from_checkpoint(str(path))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_non_floating_weights_are_refused_naming_key_and_dtype(state, dtype):
    """A copy into a float parameter would cast them (a complex one losing its imaginary part)."""
    for load in (lambda s: BaseModel(VIT, topk=None).load_checkpoint(s), BaseModel.from_checkpoint):
        with pytest.raises(ValueError, match=rf"key '{KEY}' holds {dtype} values where the model has a "
                                             r"floating-point torch.float32 tensor"):
            load(_with(state, KEY, state[KEY].to(dtype)))


def test_config_overrides_must_be_a_dict(state):
    with pytest.raises(ValueError, match="config_overrides must be a dict of ViTConfig fields to values .* got a list"):
        BaseModel.from_checkpoint(state, config_overrides=[("ln_eps", 1e-5)])
    assert BaseModel.from_checkpoint(state, config_overrides={"ln_eps": 1e-5}).config.ln_eps == 1e-5


def test_a_key_that_is_not_a_string_is_refused(state):
    with pytest.raises(ValueError, match="state dict key 1 is of type int, not a str"):
        BaseModel(VIT, topk=None).load_checkpoint({1: torch.zeros(1)})


def test_meta_tensors_are_refused_naming_the_key(state):
    meta = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
    with pytest.raises(ValueError, match=r"key '\S+' is a meta tensor \(a shape without data\)"):
        BaseModel(VIT, topk=None).load_checkpoint(meta)
    with pytest.raises(ValueError, match="is a meta tensor"):
        BaseModel.from_checkpoint(meta)


@pytest.mark.parametrize("wrap, where", [(lambda s: s, ""), (lambda s: {"model": s}, " under 'model'")])
def test_a_state_dict_with_a_stray_entry_names_it(state, wrap, where):
    n = len(state)
    with pytest.raises(ValueError, match=rf"checkpoint holds {n} tensors{where} beside 1 other value\(s\) "
                                         r"\('epoch': int\); a state dict holds tensors only: remove 'epoch'"):
        BaseModel(VIT, topk=None).load_checkpoint(wrap({**state, "epoch": 3}))


def test_a_damaged_stored_config_names_the_file_and_where_it_is(state, tmp_path):
    """An engine checkpoint records its encoder's config (model_config.encoder); one edited by
    hand into values no ViTConfig takes is refused naming the file, not as a bare ViTConfig error."""
    path = tmp_path / "ck.pth"
    torch.save({"model": state, "model_config": {"encoder": {**VIT.to_dict(), "num_heads": "2"}}}, path)
    with pytest.raises(ValueError, match=rf"{path}: the ViT config stored in its model_config.encoder is invalid "
                                         r"\(ViTConfig.num_heads must be a positive int, got '2'\)"):
        BaseModel.from_checkpoint(str(path))
