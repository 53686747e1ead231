"""Bad arguments to the public API (configs, ``from_dict``, ``EncoderAdapter``, ``Block``,
``TECModel.forward``'s mask ratio and targets) are ValueErrors naming the argument or field,
not TypeErrors / ZeroDivisionErrors from deep inside, nor a silently wrong model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tec_fast import BaseModel, BaseTargets, TECConfig, TECModel, ViTConfig
from tec_fast.models.layers import Block
from tec_fast.models.masking import block_masking, random_masking, visible_counts
from tec_fast.nn import EncoderAdapter

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _tec_kwargs(**kw):
    return dict(dict(encoder=ViTConfig(**TINY), decoder_dim=32, decoder_depth=1, decoder_heads=2), **kw)


# ------------------------------------------------------------------------------------------------
# 1. from_dict
# ------------------------------------------------------------------------------------------------
def test_from_dict_round_trips():
    vit = ViTConfig(**TINY)
    cfg = TECConfig(**_tec_kwargs())
    assert ViTConfig.from_dict(vit.to_dict()) == vit
    assert TECConfig.from_dict(cfg.to_dict()) == cfg
    assert ViTConfig.from_dict({}) == ViTConfig()  # fields left out take their defaults
    assert TECConfig.from_dict(dict(cfg.to_dict(), encoder=vit)) == cfg  # a ViTConfig as the encoder


@pytest.mark.parametrize("call, match", [
    (lambda: ViTConfig.from_dict(dict(TINY, bogus=1)),
     r"ViTConfig\.from_dict: unknown field 'bogus' \(ViTConfig's fields: img_size"),
    (lambda: ViTConfig.from_dict([1, 2]), r"ViTConfig\.from_dict: expected a dict of ViTConfig fields, got list"),
    (lambda: TECConfig.from_dict(dict(TECConfig(**_tec_kwargs()).to_dict(), bogus=1)),
     r"TECConfig\.from_dict: unknown field 'bogus' \(TECConfig's fields: encoder, decoder_dim"),
    (lambda: TECConfig.from_dict({"encoder": dict(TINY, bogus=1)}), r"TECConfig\.encoder: unknown field 'bogus'"),
    (lambda: TECConfig.from_dict({"decoder_dim": 32}), r"TECConfig\.from_dict: the field 'encoder' .* is missing"),
    (lambda: TECConfig.from_dict(None), r"TECConfig\.from_dict: expected a dict of TECConfig fields, got NoneType"),
    (lambda: TECConfig.from_dict({"encoder": [1]}),
     r"TECConfig\.encoder: expected a dict of ViTConfig fields, got list"),
    (lambda: TECConfig(encoder=dict(TINY, bogus=1)), r"TECConfig\.encoder: unknown field 'bogus'"),
])
def test_from_dict_errors_name_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# 2. ViTConfig numbers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", ["4", math.inf, math.nan, True, None, 0.0, -1.0])
def test_vit_mlp_ratio_must_be_a_finite_positive_number(ratio):
    with pytest.raises(ValueError, match=r"ViTConfig\.mlp_ratio must be a finite number > 0"):
        ViTConfig(**TINY, mlp_ratio=ratio)


def test_vit_mlp_ratio_must_give_a_hidden_width():
    with pytest.raises(ValueError, match=r"ViTConfig\.mlp_ratio \(0\.001\) gives an MLP hidden width .* = 0"):
        ViTConfig(**TINY, mlp_ratio=0.001)
    assert ViTConfig(**TINY, mlp_ratio=1 / 32).mlp_hidden == 1
    assert ViTConfig(**TINY, mlp_ratio=4).mlp_hidden == 128  # an int ratio is a number too
    assert ViTConfig(**TINY, mlp_ratio=np.float32(2.0)).mlp_hidden == 64


def test_tec_decoder_blocks_need_a_hidden_width_too():
    # embed_dim 128 * 1/64 = 2 wide, but the decoder blocks (width 32) would be int(32 / 64) = 0 wide
    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=1 / 64)
    with pytest.raises(ValueError, match=r"TECConfig\.encoder\.mlp_ratio .* int\(decoder_dim \* mlp_ratio\)"):
        TECConfig(**_tec_kwargs(encoder=vit))


@pytest.mark.parametrize("name, value", [
    ("img_size", "32"), ("img_size", 32.0), ("patch_size", True), ("embed_dim", None), ("depth", 2.5),
    ("num_heads", "2"), ("in_chans", 3.0), ("reg_tokens", 1.0), ("reg_tokens", True), ("ln_eps", "1e-6"),
    ("ln_eps", True), ("ln_eps", math.nan), ("class_token", 1), ("mlp_act", None),
])
def test_vit_fields_of_the_wrong_type_name_the_field(name, value):
    with pytest.raises(ValueError, match=rf"ViTConfig\.{name} must be"):
        ViTConfig(**dict(TINY, **{name: value}))


# ------------------------------------------------------------------------------------------------
# 3. TECConfig numbers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(tau="x"), r"TECConfig\.tau must be a finite number > 0 when relation=True, got 'x'"),
    (dict(tau=True), r"TECConfig\.tau must be a finite number > 0"),
    (dict(tau=math.inf), r"TECConfig\.tau must be a finite number > 0"),
    (dict(tau=math.nan), r"TECConfig\.tau must be a finite number > 0"),
    (dict(tau=0.0), r"TECConfig\.tau must be a finite number > 0"),
    (dict(tau=None), r"TECConfig\.tau must be a finite number > 0 when relation=True, got None"),
    (dict(relation=False, tau="x"), r"TECConfig\.tau must be a finite number > 0 or None"),
    (dict(feature_weight="a"), r"TECConfig\.feature_weight must be a finite number >= 0, got 'a'"),
    (dict(feature_weight=None), r"TECConfig\.feature_weight must be a finite number >= 0, got None"),
    (dict(feature_weight=math.inf), r"TECConfig\.feature_weight must be a finite number >= 0"),
    (dict(feature_weight=True), r"TECConfig\.feature_weight must be a finite number >= 0"),
    (dict(feature_weight=-1.0), r"TECConfig\.feature_weight must be a finite number >= 0"),
    (dict(relation_weight=math.inf), r"TECConfig\.relation_weight must be a finite number >= 0"),
    (dict(relation_weight="1"), r"TECConfig\.relation_weight must be a finite number >= 0"),
])
def test_tec_numbers_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TECConfig(**_tec_kwargs(**kwargs))


def test_tec_numbers_that_are_fine():
    assert TECConfig(**_tec_kwargs(relation=False, tau=None)).tau is None
    assert TECConfig(**_tec_kwargs(tau=2, feature_weight=0, relation_weight=np.float64(0.5))).tau == 2


# ------------------------------------------------------------------------------------------------
# 4. EncoderAdapter, Block
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    ((8, 4, 0, 16), r"EncoderAdapter\.num_groups must be a positive int, got 0"),
    ((8, "4", 2, 16), r"EncoderAdapter\.depth must be a positive int, got '4'"),
    ((8, 4, 2, -1), r"EncoderAdapter\.hidden must be a positive int, got -1"),
    ((8, 4, -2, 16), r"EncoderAdapter\.num_groups must be a positive int, got -2"),
    ((0, 4, 2, 16), r"EncoderAdapter\.dim must be a positive int, got 0"),
    ((8.0, 4, 2, 16), r"EncoderAdapter\.dim must be a positive int, got 8\.0"),
    ((8, 4, 2, True), r"EncoderAdapter\.hidden must be a positive int, got True"),
    ((8, 4, 3, 16), r"depth \(4\) must be divisible by num_groups \(3\)"),
])
def test_encoder_adapter_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        EncoderAdapter(*args)


def test_encoder_adapter_input_is_one_stacked_tensor():
    adapter = EncoderAdapter(4, 6, 2, 5)
    with pytest.raises(ValueError, match=r"feats must be one tensor \[D=6, B, T, C=4\], got a list "
                                         r"\(stack the D block outputs"):
        adapter([torch.randn(2, 3, 4)] * 6)
    with pytest.raises(ValueError, match=r"got \(5, 2, 3, 4\)$"):
        adapter(torch.randn(5, 2, 3, 4))


@pytest.mark.parametrize("args, kwargs, match", [
    ((8, 0), {}, r"Block\.num_heads must be a positive int, got 0"),
    ((0, 2), {}, r"Block\.dim must be a positive int, got 0"),
    (("8", 2), {}, r"Block\.dim must be a positive int, got '8'"),
    ((8, 3), {}, r"Block\.dim \(8\) must be divisible by Block\.num_heads \(3\)"),
    ((8, 2, "4"), {}, r"Block\.mlp_ratio must be a finite number > 0, got '4'"),
    ((8, 2, math.inf), {}, r"Block\.mlp_ratio must be a finite number > 0"),
    ((8, 2, 0.01), {}, r"Block\.mlp_ratio \(0\.01\) gives an MLP hidden width"),
    ((8, 2), dict(ln_eps=0.0), r"Block\.ln_eps must be"),
    ((8, 2), dict(layer_scale="yes"), r"Block\.layer_scale must be a bool"),
    ((8, 2), dict(act="relu"), r"Block\.act must be one of"),
])
def test_block_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Block(*args, **kwargs)


def test_block_and_adapter_that_are_fine():
    assert Block(8, 2, 0.5).mlp.fc1.out_features == 4
    assert Block(8, 2, 1).mlp.fc1.out_features == 8
    assert len(EncoderAdapter(8, 4, 2, 16).fuse_fcs) == 2


# ------------------------------------------------------------------------------------------------
# 5. TECModel.forward: mask_ratio, targets
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vit = ViTConfig(**TINY)
    base = BaseModel(vit, topk=3)
    model = TECModel(TECConfig(**_tec_kwargs()))
    x = torch.randn(2, 3, 32, 32)
    return model, x, base(x)


@pytest.mark.parametrize("ratio, match", [
    ("0.75", r"mask_ratio must be a number in \[0, 1\), or one per image .*got str '0\.75'"),
    (None, r"mask_ratio must be .*got NoneType None"),
    ({}, r"mask_ratio must be .*got dict"),
    (True, r"mask_ratio must be .*got bool True"),
    (["0.5", "0.5"], r"mask_ratio must be .*; mask_ratio\[0\] is str '0\.5'"),
    ([0.5, None], r"mask_ratio\[1\] is NoneType None"),
    ([[0.5], [0.5]], r"mask_ratio\[0\] is list"),
    (torch.tensor([True, False]), r"mask_ratio must be .*dtype torch\.bool"),
    (torch.tensor([0.5, 0.6], dtype=torch.complex64), r"mask_ratio must be .*dtype torch\.complex64"),
    (np.array(["a", "b"]), r"mask_ratio must be .*dtype <U1"),
])
def test_mask_ratio_of_the_wrong_type(tiny, ratio, match):
    model, x, t = tiny
    with pytest.raises(ValueError, match=match):
        model(x, t, mask_ratio=ratio)


def test_mask_ratio_forms_that_work(tiny):
    model, x, t = tiny
    noise = torch.rand(2, 16)
    dense = model(x, t, mask_ratio=0.75, noise=noise)["loss"]
    for ratio in (0.75, np.float64(0.75), torch.tensor(0.75)):
        assert torch.equal(model(x, t, mask_ratio=ratio, noise=noise)["loss"], dense)
    packed = model(x, t, mask_ratio=[0.5, 0.75], noise=noise)["loss"]
    for ratio in ((0.5, 0.75), torch.tensor([0.5, 0.75]), np.array([0.5, 0.75]),
                  [np.float32(0.5), torch.tensor(0.75)]):
        torch.testing.assert_close(model(x, t, mask_ratio=ratio, noise=noise)["loss"], packed)


def test_masking_functions_check_the_ratio_type():
    with pytest.raises(ValueError, match="mask_ratio must be a number in"):
        random_masking(2, 16, "0.5")
    with pytest.raises(ValueError, match="mask_ratio must be a number in"):
        random_masking(2, 16, [0.5, 0.5])  # one ratio for all images here
    with pytest.raises(ValueError, match="mask_ratio must be a number in"):
        block_masking(2, 4, "0.5")
    with pytest.raises(ValueError, match=r"mask_ratio\[1\] is str"):
        visible_counts([16, 16], [0.5, "0.5"])
    assert visible_counts([16, 16], 0.5) == [8, 8]


@pytest.mark.parametrize("field, make, match", [
    ("features", lambda t: t.features.tolist(), r"targets\.features\[0\] must be a tensor \[L_b, pred_dim\]"),
    ("features", lambda t: None, r"targets\.features must be a \[B, L, pred_dim\] = \(2, 16, 32\) tensor or a list"),
    ("features", lambda t: "abc", r"targets\.features must be .*got str"),
    ("relation", lambda t: t.relation.tolist(), r"targets\.relation must be a tensor .*got list"),
    ("topk_idx", lambda t: t.topk_idx.tolist(), r"targets\.topk_idx must be a tensor .*got list"),
    ("topk_idx", lambda t: t.topk_idx.numpy(), r"targets\.topk_idx must be a tensor .*got ndarray \(2, 3\)"),
])
def test_targets_fields_must_be_tensors(tiny, field, make, match):
    model, x, t = tiny
    with pytest.raises(ValueError, match=match):
        model(x, t._replace(**{field: make(t)}))


def test_per_image_target_lists(tiny):
    model, x, t = tiny
    noise = torch.rand(2, 16)
    want = model(x, t, noise=noise)["loss"]
    lists = BaseTargets(list(t.features), list(t.relation), list(t.topk_idx))
    torch.testing.assert_close(model(x, lists, noise=noise)["loss"], want)  # the NativeTargets form
    with pytest.raises(ValueError, match=r"targets\.relation\[1\] must be a tensor, got list"):
        model(x, lists._replace(relation=[t.relation[0], t.relation[1].tolist()]))
    with pytest.raises(ValueError, match=r"targets\.topk_idx\[0\] must be a tensor \[k\], got Tensor \(\)"):
        model(x, lists._replace(topk_idx=[t.topk_idx[0, 0], t.topk_idx[1, 0]]))
    with pytest.raises(ValueError, match=r"targets\.relation must be a list of 2 tensors .*got Tensor"):
        model(x, lists._replace(relation=t.relation))
