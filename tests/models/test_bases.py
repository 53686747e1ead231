"""Every base family against its reference library (timm, transformers): features, relation
targets, final-norm tokens and position embeddings, at the saved grid and resampled to others.

The references are fixtures made once by tests/fixtures/make_base_fixtures.py (versions in
tests/fixtures/bases/versions.json); where timm / transformers import, the same cases are also
recomputed live and compared.
"""
import json
import os
import sys
import warnings

import pytest
import torch

from tec_fast import BaseModel, ViTConfig
from tec_fast.checkpoint import (export_hf_vit, export_timm, read_checkpoint, read_safetensors,
                                 resample_pos_embed, save_export, write_safetensors)

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
BASES = os.path.join(FIX, "bases")
sys.path.insert(0, FIX)
import make_base_fixtures as mk  # noqa: E402

REF = torch.load(os.path.join(BASES, "reference.pth"), weights_only=True)
VERSIONS = json.load(open(os.path.join(BASES, "versions.json")))
ATOL = RTOL = 1e-5  # fp32, the bar for every family

# family -> (checkpoint file, from_checkpoint overrides, expected ViTConfig fields)
FAMILIES = {
    "vit": ("vit.pth", None, dict(patch_size=8, layer_scale=False, reg_tokens=0)),
    "deit3": ("deit3.pth", None, dict(no_embed_class=True, layer_scale=True)),
    "deit_distilled": ("deit_distilled.pth", None, dict(reg_tokens=1, no_embed_class=False)),
    "dinov2": ("dinov2.safetensors", None, dict(patch_size=14, layer_scale=True, img_size=56)),
    "dinov2_reg": ("dinov2_reg.pth", None, dict(reg_tokens=4, no_embed_class=True, layer_scale=True)),
    "clip": ("clip.pth", None, dict(pre_norm=True, patch_bias=False, ln_eps=1e-5)),
    "clip_quickgelu": ("clip_quickgelu.pth", {"mlp_act": "quick_gelu"}, dict(pre_norm=True)),
    "gap": ("gap.pth", None, dict(class_token=False)),
}
CASES = [(fam, int(key.split("@")[1])) for fam in FAMILIES for key in REF if key.startswith(fam + "@")]


def _load(path, size, overrides=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heads, decoders: reported, not the point here
        return BaseModel.from_checkpoint(path, img_size=size, config_overrides=overrides, **kw)


def _check(base, ref, relation=True):
    x = ref["input"]
    t = base(x)
    torch.testing.assert_close(t.features, ref["features"], atol=ATOL, rtol=RTOL)
    P = ref["num_prefix_tokens"]
    torch.testing.assert_close(base.encode(x, pool="mean"), ref["tokens"][:, P:].mean(1), atol=ATOL, rtol=RTOL)
    if base.config.class_token:
        torch.testing.assert_close(base.encode(x, pool="cls"), ref["tokens"][:, 0], atol=ATOL, rtol=RTOL)
    if relation and "relation" in ref:
        assert torch.equal(t.topk_idx, ref["topk_idx"])
        torch.testing.assert_close(t.relation, ref["relation"], atol=ATOL, rtol=RTOL)
    if "pos_embed" in ref:
        torch.testing.assert_close(base.pos_embed, ref["pos_embed"], atol=1e-6, rtol=0)
    return t


def test_fixtures_say_what_made_them():
    assert {"torch", "timm", "transformers", "safetensors"} <= set(VERSIONS)
    assert len(CASES) >= 17


@pytest.mark.parametrize("family,size", CASES, ids=[f"{f}@{s}" for f, s in CASES])
def test_timm_family_matches_reference(family, size):
    file, overrides, expected = FAMILIES[family]
    ref = REF[f"{family}@{size}"]
    base = _load(os.path.join(BASES, file), size, overrides, num_heads=mk.HEADS,
                 topk=mk.TOPK if "relation" in ref else None)
    for field, value in expected.items():
        if field != "img_size":
            assert getattr(base.config, field) == value, field
    assert base.config.img_size == size
    _check(base, ref)


def test_architecture_inferred_without_help():
    """Native grid (DINOv2's patch 14, 4x4 here) and every variant flag come from the weights alone."""
    base = _load(os.path.join(BASES, "dinov2.safetensors"), None, num_heads=mk.HEADS)
    assert (base.config.img_size, base.config.patch_size, base.config.depth, base.config.embed_dim) == (56, 14, 3, 32)
    _check(base, REF["dinov2@56"], relation=False)
    # heads are not in the weights: width / 64 unless given (or a config says)
    big = {"patch_embed.proj.weight": torch.randn(128, 3, 4, 4), "patch_embed.proj.bias": torch.zeros(128),
           "cls_token": torch.zeros(1, 1, 128), "pos_embed": torch.zeros(1, 17, 128)}
    big.update({k: v for k, v in BaseModel(ViTConfig(16, 4, 128, 2, 2)).state_dict().items() if k.startswith("blocks.")})
    b = _load(big, None)
    assert (b.config.num_heads, b.config.img_size) == (2, 16)
    assert any("width/64" in n for n in b.load_report.notes)


def test_where_the_base_head_count_came_from():
    """infer_base_vit says where the head count came from (the trainer warns on a guess without
    reading note text); a head count given keeps the other notes (the CLIP tower's assumed
    ln_eps was dropped with the head-count note they were joined into)."""
    from tec_fast.checkpoint import infer_base_vit
    state = BaseModel(ViTConfig(16, 4, 128, 2, 2, pre_norm=True), topk=None).state_dict()
    vit, notes, heads_from = infer_base_vit(state)
    assert (vit.num_heads, heads_from) == (2, "guessed")
    assert [n.split(" ")[0] for n in notes] == ["ln_eps=1e-5", "num_heads=2"]
    vit, notes, heads_from = infer_base_vit(state, num_heads=4)
    assert (vit.num_heads, heads_from) == (4, "given") and [n.split(" ")[0] for n in notes] == ["ln_eps=1e-5"]
    assert infer_base_vit(state, stored={"num_heads": 8})[2] == "stored"
    assert infer_base_vit(state, hf_config={"num_attention_heads": 1})[2] == "config.json"
    vitb = BaseModel(ViTConfig(32, 16, 768, 12, 12), topk=None).state_dict()
    assert infer_base_vit(vitb)[1:] == (["num_heads=12 from preset vit_base_patch16 (not stored in weights)"],
                                        "preset")


def test_clip_activation_cannot_be_read_from_weights():
    """OpenAI CLIP's QuickGELU is not in the weights: without the override the features differ."""
    ref = REF["clip_quickgelu@32"]
    plain = _load(os.path.join(BASES, "clip_quickgelu.pth"), 32, num_heads=mk.HEADS)
    assert (plain(ref["input"]).features - ref["features"]).abs().max() > 1e-3


def test_dinov2_official_register_layout():
    """DINOv2's release (register_tokens, CLS inside pos_embed, mask_token, iBOT-style teacher
    wrapper) loads as timm's converter reads it."""
    base = _load(os.path.join(BASES, "dinov2_reg_official.pth"), 56, num_heads=mk.HEADS, topk=mk.TOPK)
    assert base.config.reg_tokens == 4 and base.config.no_embed_class
    assert "mask_token" in base.load_report.ignored
    _check(base, REF["dinov2_reg@56"])
    _check(_load(os.path.join(BASES, "dinov2_reg_official.pth"), 28, num_heads=mk.HEADS, topk=mk.TOPK),
           REF["dinov2_reg@28"])


@pytest.mark.parametrize("src", ["hf_vit", "hf_vit_state_dict.pth", "hf_mae"])
def test_hugging_face_checkpoints(src):
    ref = REF["hf_mae@32" if "mae" in src else "hf_vit@32"]
    path = os.path.join(BASES, src)
    base = _load(path, None, num_heads=None if os.path.isdir(path) else mk.HEADS, topk=mk.TOPK)
    assert base.config.num_heads == mk.HEADS and base.config.ln_eps == 1e-12
    _check(base, ref)
    if src == "hf_mae":
        assert any(k.startswith("decoder.") for k in base.load_report.ignored)


def test_resample_matches_timm():
    """timm's convention (bicubic, align_corners=False, antialias, prefix rows kept), done here in
    float64: the engine's fp32 resampling and timm's stored output both lie within 5e-6 of it
    (values up to 3.4; measured 2.6e-6 with ATEN_CPU_CAPABILITY=default, whose scalar kernels
    round differently from the vectorised ones that made the fixture, which are exact to it)."""
    import torch.nn.functional as F
    r = REF["resample"]
    table, prefix = r["table"], r["num_prefix"]
    C = table.shape[-1]
    for grid, want in r["out"].items():
        h, w = map(int, grid.split("x"))
        got = resample_pos_embed(table, (h, w), (5, 5), num_prefix=prefix)
        image = table[:, prefix:].double().reshape(1, 5, 5, C).permute(0, 3, 1, 2)
        exact = F.interpolate(image, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        exact = torch.cat([table[:, :prefix].double(), exact.permute(0, 2, 3, 1).reshape(1, h * w, C)], 1)
        torch.testing.assert_close(got.double(), exact, atol=5e-6, rtol=0)
        torch.testing.assert_close(want.double(), exact, atol=5e-6, rtol=0)
        assert torch.equal(got[:, :prefix], table[:, :prefix])  # prefix rows kept as stored


def test_refuses_what_the_model_does_not_have():
    """A plain base given DINOv2 / registers / CLIP weights names the keys (issue 10)."""
    plain = BaseModel(ViTConfig(56, 14, 32, 3, 2), topk=None)
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma.*LayerScale: ViTConfig\(layer_scale=True\)"):
        plain.load_checkpoint(os.path.join(BASES, "dinov2.safetensors"))
    with pytest.raises(ValueError, match=r"reg_token.*register tokens"):
        BaseModel(ViTConfig(56, 14, 32, 3, 2, layer_scale=True), topk=None).load_checkpoint(
            os.path.join(BASES, "dinov2_reg.pth"))
    with pytest.raises(ValueError, match=r"norm_pre\.weight"):
        BaseModel(ViTConfig(32, 8, 32, 3, 2, patch_bias=False), topk=None).load_checkpoint(
            os.path.join(BASES, "clip.pth"))
    sd = read_checkpoint(os.path.join(BASES, "vit.pth"))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.q_norm\.weight"):
        BaseModel(ViTConfig(32, 8, 32, 3, 2), topk=None).load_checkpoint(
            dict(sd, **{"blocks.1.attn.q_norm.weight": torch.ones(16)}))
    bad = dict(sd, pos_embed=torch.zeros(1, 1 + 12, 32))  # 12 patches: no square grid
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 13, 32\).*\(1, 17, 32\)"):
        BaseModel(ViTConfig(32, 8, 32, 3, 2), topk=None).load_checkpoint(bad)
    with pytest.raises(ValueError, match="topk must be None for a base without a CLS token"):
        BaseModel(ViTConfig(32, 8, 32, 3, 2, class_token=False), topk=3)


def test_load_checkpoint_resamples_into_a_configured_model():
    """The Public API path (a configured ViTConfig at another size) resamples like from_checkpoint."""
    b = BaseModel(ViTConfig(48, 8, 32, 3, 2), topk=mk.TOPK)
    report = b.load_checkpoint(os.path.join(BASES, "vit.pth"))
    assert any("4x4 to a 6x6" in n for n in report.notes)
    _check(b, REF["vit@48"])


def test_export_timm_layouts():
    base = _load(os.path.join(BASES, "vit.pth"), 32, num_heads=mk.HEADS)
    for pool in ("token", "avg"):
        sd = export_timm(base, global_pool=pool)
        assert {k: list(v.shape) for k, v in sd.items()} == REF["timm_keys"][pool]
    with pytest.raises(ValueError, match="global_pool"):
        export_timm(base, global_pool="map")


def test_export_hf_vit_round_trip(tmp_path):
    base = _load(os.path.join(BASES, "hf_vit"), None, topk=mk.TOPK)
    hf = export_hf_vit(base, tmp_path / "out")
    theirs, _ = read_safetensors(os.path.join(BASES, "hf_vit", "model.safetensors"))
    assert {k: v.shape for k, v in hf.items()} == {k: v.shape for k, v in theirs.items() if not k.startswith("pooler.")}
    for k, v in hf.items():
        torch.testing.assert_close(v, theirs[k], atol=0, rtol=0)
    mine = json.load(open(tmp_path / "out" / "config.json"))
    cfg = json.load(open(os.path.join(BASES, "hf_vit", "config.json")))
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias"):
        assert mine[key] == cfg[key], key
    _check(_load(str(tmp_path / "out"), None, topk=mk.TOPK), REF["hf_vit@32"])
    with pytest.raises(ValueError, match="layer_scale"):
        export_hf_vit(_load(os.path.join(BASES, "deit3.pth"), 32, num_heads=2), tmp_path / "no")


def test_safetensors_io(tmp_path):
    state, meta = read_safetensors(os.path.join(BASES, "dinov2.safetensors"))  # written by the library
    assert state["pos_embed"].shape == (1, 17, 32) and meta.get("format") in (None, "pt")
    mixed = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16),
             "d": torch.tensor([True, False]), "e": torch.zeros(0, 3)}
    write_safetensors(mixed, tmp_path / "m.safetensors", {"format": "pt", "note": "x"})
    back, meta = read_safetensors(str(tmp_path / "m.safetensors"))
    assert meta == {"format": "pt", "note": "x"}
    for k, v in mixed.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert save_export(export_timm(_load(os.path.join(BASES, "vit.pth"), 32, num_heads=2)),
                       tmp_path / "enc.safetensors") == "safetensors"
    _check(_load(str(tmp_path / "enc.safetensors"), 32, num_heads=2, topk=mk.TOPK), REF["vit@32"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_checkpoint(str(tmp_path / "bad.safetensors"))
    whole = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:-8])  # a tensor's bytes missing
    with pytest.raises(ValueError, match="cut.safetensors"):
        read_checkpoint(str(tmp_path / "cut.safetensors"))
    import safetensors.torch as st
    torch.testing.assert_close(st.load_file(str(tmp_path / "m.safetensors"))["a"], mixed["a"])
    # views of one storage (the q/k/v thirds of a qkv weight) are written as separate tensors
    qkv = torch.randn(6, 4)
    write_safetensors(dict(zip("qkv", qkv.chunk(3))), tmp_path / "views.safetensors")
    back, _ = read_safetensors(str(tmp_path / "views.safetensors"))
    assert all(torch.equal(back[n], t) for n, t in zip("qkv", qkv.chunk(3)))
    with pytest.raises(ValueError, match="tensors only"):
        write_safetensors({"a": 1.0}, tmp_path / "x.safetensors")


# ------------------------------------------------------------------------- live comparison
def _tokens(base, x):
    """The last block's output, all tokens, before the final norm."""
    x = base.embed(x)
    for blk in base.blocks:
        x = blk(x)
    return x


def _live(module):
    try:
        return __import__(module)
    except Exception:  # timm needs torchvision, which may not load beside a CPU torch
        pytest.skip(f"{module} does not import here; the fixtures cover it")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_live_timm(family):
    timm = _live("timm")
    sizes = sorted({s for f, s in CASES if f == family})
    first = int(next(k for k in REF if k.startswith(family + "@")).split("@")[1])
    state, ref0 = mk.timm_case(timm, family, first)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"live_{family}_{os.getpid()}.pth")
    torch.save(state, path)
    try:
        overrides = FAMILIES[family][1]
        for size in sizes:
            ref = mk.timm_case(timm, family, size, state)[1] if size != first else ref0
            _check(_load(path, size, overrides, num_heads=mk.HEADS, topk=mk.TOPK if "relation" in ref else None), ref)
        for pool in ("token", "avg"):  # export loads into timm strictly and gives its features
            from timm.models.vision_transformer import VisionTransformer
            if family != "vit":
                break
            m = VisionTransformer(img_size=first, patch_size=8, embed_dim=mk.DIM, depth=mk.DEPTH,
                                  num_heads=mk.HEADS, num_classes=0, global_pool=pool).eval()
            base = _load(path, first, num_heads=mk.HEADS)
            m.load_state_dict(export_timm(base, global_pool=pool), strict=True)
            with torch.no_grad():
                out = m.forward_head(m.forward_features(ref0["input"]), pre_logits=True)
            with torch.no_grad():
                tokens = _tokens(base, ref0["input"])  # timm: CLS after the norm, or the norm (fc_norm) of the mean
                want = base.norm(tokens)[:, 0] if pool == "token" else base.norm(tokens[:, 1:].mean(1))
            torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)
    finally:
        os.unlink(path)


def test_live_transformers(tmp_path):
    transformers = _live("transformers")
    for kind in ("vit", "mae"):
        model, ref = mk.hf_case(transformers, kind)
        model.save_pretrained(tmp_path / kind)
        base = _load(str(tmp_path / kind), None, topk=mk.TOPK)
        _check(base, ref)
        if kind == "vit":  # our HF export loads into ViTModel and gives the same features
            export_hf_vit(base, tmp_path / "export")
            back = transformers.ViTModel.from_pretrained(str(tmp_path / "export")).eval()
            with torch.no_grad():
                out = back(pixel_values=ref["input"])
            torch.testing.assert_close(out.last_hidden_state, ref["tokens"], atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------- training at another size
@pytest.mark.parametrize("size", [24, 48])
def test_new_model_trains_at_another_size_than_the_base_was_saved(size):
    """A base saved at 32 (4x4) gives targets at 24 / 48 and a TEC model built for that grid
    (its own sin-cos table) trains on them: what `train --img-size` does with a 224 base."""
    from tec_fast import TECConfig, TECModel
    from tec_fast.models.layers import sincos_pos_embed
    base = _load(os.path.join(BASES, "vit.pth"), size, num_heads=mk.HEADS, topk=mk.TOPK)
    cfg = TECConfig(encoder=base.config.plain(), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                    pred_dim=base.config.embed_dim, pred_heads=base.config.num_heads, num_adapters=1, tau=1.8)
    torch.manual_seed(0)
    model = TECModel(cfg)
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed(mk.DIM, size // 8), atol=0, rtol=0)
    x = torch.randn(2, 3, size, size)
    out = model(x, base(x), mask_ratio=0.75)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # its checkpoint loads into a model for yet another size: fixed tables are rebuilt, not read
    other = TECModel(TECConfig.from_dict(dict(cfg.to_dict(), encoder=dict(cfg.encoder.to_dict(), img_size=40))))
    report = other.load_checkpoint(model.state_dict())
    assert any("pos_embed of another grid skipped" in n for n in report.notes)
    torch.testing.assert_close(other.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(other.pos_embed[0], sincos_pos_embed(mk.DIM, 5), atol=0, rtol=0)


def test_config_round_trip_and_plain_encoder():
    vit = ViTConfig(56, 14, 32, 3, 2, reg_tokens=4, no_embed_class=True, layer_scale=True, ln_eps=1e-5,
                    mlp_act="quick_gelu", pre_norm=True, patch_bias=False)
    assert ViTConfig.from_dict(vit.to_dict()) == vit
    assert ViTConfig(**{k: v for k, v in vit.to_dict().items() if k in ("img_size", "patch_size")}).is_plain
    from tec_fast import TECConfig
    with pytest.raises(ValueError, match="TECConfig.encoder must be a plain ViT.*layer_scale"):
        TECConfig(encoder=vit)
    assert TECConfig(encoder=vit.plain()).encoder.to_dict()["reg_tokens"] == 0
    for bad, match in ((dict(reg_tokens=-1), "reg_tokens"), (dict(mlp_act="relu"), "mlp_act"),
                       (dict(ln_eps=0.0), "ln_eps"), (dict(layer_scale=1), "layer_scale")):
        with pytest.raises(ValueError, match=f"ViTConfig.{match}"):
            ViTConfig(**bad)


def test_from_checkpoint_takes_its_arguments_by_position():
    """src, img_size, num_heads, last_layers, topk: the documented order, positional or named."""
    path = os.path.join(BASES, FAMILIES["vit"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = BaseModel.from_checkpoint(path, 32, None, 1, 3)
        b = BaseModel.from_checkpoint(path, img_size=32, last_layers=1, topk=3)
    assert a.config == b.config and a.config.img_size == 32 and a.topk == 3
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a(x).features, b(x).features)
