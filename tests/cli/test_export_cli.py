"""``python -m tec_fast.export`` formats: timm (token pool), timm with global_pool='avg'
(``fc_norm``), safetensors output, and a Hugging Face ViTModel folder; each loads back as a base."""
from __future__ import annotations

import json

import pytest
import torch

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast.checkpoint import read_checkpoint
from tec_fast.cli.export import FORMATS, main

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


# ---------------------------------------------------------------- architecture from the weights
@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """A TEC checkpoint saved by ``fit`` exactly as the demo saves its own: the demo's encoder
    (vit_demo_patch4 at 32: width 128, 6 blocks) and no model config recorded beside the weights."""
    from tec_fast.demo.recipe import DEMO_IMG, DEMO_MODEL
    from tec_fast.presets import vit_preset
    from tec_fast.training import FitConfig, fit
    from tec_fast.training.objectives import TECObjective

    out = tmp_path_factory.mktemp("demo_tec")
    vit = vit_preset(DEMO_MODEL, DEMO_IMG)
    torch.manual_seed(0)
    base = BaseModel(vit, last_layers=2, topk=3)
    tec = TECModel(TECConfig(encoder=vit, decoder_dim=64, decoder_depth=1, decoder_heads=4, tau=1.0))
    images = torch.utils.data.TensorDataset(torch.randn(4, 3, DEMO_IMG, DEMO_IMG), torch.zeros(4))
    fit(tec, TECObjective(base, 0.75, vit.num_patches), images,
        FitConfig(name="tec", output_dir=str(out), max_steps=1, batch_size=4, lr=1e-4, warmup_steps=0,
                  precision="fp32", seed=0, progress=False))
    path = out / "checkpoint-last.pth"
    assert "model_config" not in read_checkpoint(str(path))
    return path, tec


def test_demo_checkpoint_exports_without_flags(tmp_path, demo_ckpt, capsys):
    path, tec = demo_ckpt
    assert main([str(path), str(tmp_path / "enc.pth")]) == 0
    out = capsys.readouterr().out
    assert "width 128, 6 blocks, 4 heads, image 32" in out
    enc = read_checkpoint(str(tmp_path / "enc.pth"))
    assert sum(k.endswith("attn.qkv.weight") for k in enc) == 6
    base = BaseModel.from_checkpoint(str(tmp_path / "enc.pth"))
    assert (base.config.embed_dim, base.config.depth, base.config.num_heads, base.config.img_size) == (128, 6, 4, 32)
    x = torch.randn(2, 3, 32, 32)
    # the exported encoder is the trained one (MLP(cls) folded into cls_token): same features
    from tec_fast.models.layout import TokenLayout
    with torch.no_grad():
        last = tec.eval().encode(TokenLayout([(8, 8)] * 2), x)[-1]  # [B, 1+L, C] after the final norm
    torch.testing.assert_close(base.encode(x), last[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    state = torch.load(path, weights_only=False)["model"]
    torch.testing.assert_close(enc["blocks.5.mlp.fc2.weight"], state["blocks.5.mlp.fc2.weight"], atol=0, rtol=0)
    assert main([str(path), str(tmp_path / "enc2.pth"), "--model", "vit_demo_patch4", "--img-size", "32"]) == 0


@pytest.mark.parametrize("flags, expect", [
    (["--model", "vit_base_patch16"], "use --model vit_demo_patch4"),
    (["--img-size", "224"], "use --img-size 32"),
])
def test_contradicting_flag_is_named_with_the_value_that_works(tmp_path, demo_ckpt, capsys, flags, expect):
    path, _ = demo_ckpt
    assert main([str(path), str(tmp_path / "enc.pth"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and expect in err and len(err.splitlines()) == 1
    assert not (tmp_path / "enc.pth").exists()


def test_no_position_embedding_asks_for_img_size(tmp_path, demo_ckpt, capsys):
    path, _ = demo_ckpt
    ck = torch.load(path, weights_only=False)
    del ck["model"]["pos_embed"]
    torch.save({"model": ck["model"]}, tmp_path / "nopos.pth")
    assert main([str(tmp_path / "nopos.pth"), str(tmp_path / "enc.pth")]) == 2
    assert "pass --img-size" in capsys.readouterr().err


def test_eval_reads_the_demo_checkpoint_and_names_the_flag_that_works(demo_ckpt):
    from tec_fast.cli import eval as eval_cli

    path, _ = demo_ckpt
    _, vit, _, _ = eval_cli.load_encoder(eval_cli.parse_args([str(path), "--quiet"]))
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.img_size) == (128, 6, 4, 32)
    _, vit, _, _ = eval_cli.load_encoder(eval_cli.parse_args([str(path), "--quiet", "--model", "vit_demo_patch4"]))
    assert vit.img_size == 32  # the grid of the stored table, not 224
    for flags, expect in ((["--model", "vit_base_patch16"], "use --model vit_demo_patch4"),
                          (["--depth", "12"], "use --depth 6")):
        with pytest.raises(ValueError, match=expect):
            eval_cli.load_encoder(eval_cli.parse_args([str(path), "--quiet", *flags]))


def test_mae_training_checkpoint_without_config_exports_its_encoder(tmp_path, capsys):
    """The demo's MAE-continued stage saves no model config: the MAE decoder's keys tell the layout."""
    from tec_fast.models.mae import MAEModel

    torch.manual_seed(0)
    mae = MAEModel(VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pth")
    assert main([str(tmp_path / "mae.pth"), str(tmp_path / "enc.pth")]) == 0
    enc = read_checkpoint(str(tmp_path / "enc.pth"))["model"]
    want = mae.encoder_state_dict()
    assert set(enc) == set(want) and all(torch.equal(enc[k], want[k]) for k in want)
    assert main([str(tmp_path / "mae.pth"), str(tmp_path / "e2.pth"), "--model", "vit_base_patch16"]) == 2
    assert "leave --model out" in capsys.readouterr().err


# ------------------------------------------------------------- MAE checkpoints, every format
@pytest.fixture()
def mae_ckpt(tmp_path):
    """An MAE training checkpoint as ``train --objective mae`` saves it (kind and model config)."""
    from tec_fast.models.mae import MAEModel

    torch.manual_seed(0)
    mae = MAEModel(VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"kind": "mae", "model": mae.state_dict(), "model_config": mae.config_dict()}, path)
    return path, mae


def test_mae_checkpoint_exports_every_format(tmp_path, mae_ckpt, capsys):
    from safetensors.torch import load_file

    path, mae = mae_ckpt
    want = mae.encoder_state_dict()
    assert main([str(path), str(tmp_path / "mae.pth")]) == 0  # the MAE release layout
    assert set(read_checkpoint(str(tmp_path / "mae.pth"))["model"]) == set(want)
    assert main([str(path), str(tmp_path / "mae.safetensors")]) == 0
    flat = load_file(str(tmp_path / "mae.safetensors"))  # a real safetensors file, not a pickle
    assert set(flat) == set(want) and all(torch.equal(flat[k], want[k]) for k in want)
    assert main([str(path), str(tmp_path / "avg.pth"), "--format", "timm-avg"]) == 0
    avg = read_checkpoint(str(tmp_path / "avg.pth"))
    assert "norm.weight" not in avg and torch.equal(avg["fc_norm.weight"], want["norm.weight"])
    assert main([str(path), str(tmp_path / "hf"), "--format", "hf"]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    sizes = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["image_size"])
    assert sizes == (32, 3, 2, 32)
    x = torch.randn(2, 3, 32, 32)
    ref = BaseModel.from_checkpoint(str(tmp_path / "mae.pth"), num_heads=2)
    for out in ("mae.safetensors", "avg.pth", "hf"):
        got = BaseModel.from_checkpoint(str(tmp_path / out), num_heads=2)
        torch.testing.assert_close(got.encode(x), ref.encode(x), atol=1e-5, rtol=1e-5)
    assert "width 32, 3 blocks, 2 heads, image 32" in capsys.readouterr().out


@pytest.mark.parametrize("flags, expect", [
    (["--model", "vit_base_patch16"], ["width 32, 3 blocks", "--model vit_base_patch16 (patch 16, width 768"]),
    (["--img-size", "48"], ["records img_size=32", "--img-size 48"]),
    (["--num-heads", "4"], ["records num_heads=2", "--num-heads 4"]),
])
def test_mae_flags_contradicting_the_stored_config_are_refused(tmp_path, mae_ckpt, capsys, flags, expect):
    path, _ = mae_ckpt
    for fmt in FORMATS:
        assert main([str(path), str(tmp_path / "out"), "--format", fmt, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and all(e in err for e in expect), err
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- the head count
@pytest.fixture()
def no_preset_ckpt(tmp_path):
    """Raw TEC weights with no config recorded and an encoder no preset matches (width 32)."""
    torch.manual_seed(0)
    cfg = TECConfig(encoder=VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2, num_adapters=1)
    path = tmp_path / "raw.pth"
    torch.save({"model": TECModel(cfg).state_dict()}, path)
    return path


def _flags_named(text):
    import re
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))


def test_a_guessed_head_count_needs_num_heads_for_hf(tmp_path, no_preset_ckpt, capsys):
    from tec_fast.cli.export import build_parser

    known = set(build_parser()._option_string_actions)
    assert main([str(no_preset_ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "pass --num-heads" in err and "num_heads=1" in err and not (tmp_path / "hf").exists()
    assert _flags_named(err) <= known
    assert main([str(no_preset_ckpt), str(tmp_path / "enc.pth")]) == 0  # timm files hold no head count
    out = capsys.readouterr().out
    assert "guessed" in out and "--num-heads" in out and _flags_named(out) <= known
    assert main([str(no_preset_ckpt), str(tmp_path / "hf"), "--format", "hf", "--num-heads", "2"]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["num_attention_heads"] == 2
    assert "num_heads=2 from --num-heads" in capsys.readouterr().out
    assert main([str(no_preset_ckpt), str(tmp_path / "e3.pth"), "--num-heads", "3"]) == 2
    err = capsys.readouterr().err
    assert "--num-heads 3 does not divide the encoder's width 32" in err and _flags_named(err) <= known


def test_num_heads_contradicting_model_is_refused(tmp_path, demo_ckpt, capsys):
    path, _ = demo_ckpt
    with pytest.raises(SystemExit) as e:
        main([str(path), str(tmp_path / "enc.pth"), "--model", "vit_demo_patch4", "--num-heads", "2"])
    assert e.value.code == 2 and "vit_demo_patch4, which has 4 heads" in capsys.readouterr().err


def test_load_errors_name_the_checkpoint_file(tmp_path, ckpt, capsys):
    ck = torch.load(ckpt, weights_only=False)
    del ck["model"]["blocks.1.attn.qkv.weight"]
    torch.save(ck, tmp_path / "broken.pth")
    assert main([str(tmp_path / "broken.pth"), str(tmp_path / "enc.pth")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'broken.pth'} lacks TEC-model keys" in err and "<dict>" not in err


# ------------------------------------------------------------------- timm-avg read back
def test_timm_avg_export_reads_back_with_the_features_of_the_timm_export(tmp_path, ckpt):
    ck = torch.load(ckpt, weights_only=False)
    torch.manual_seed(1)
    for key in ("norm.weight", "norm.bias"):  # a trained final norm, far from unit scale and zero shift
        ck["model"][key] = torch.randn_like(ck["model"][key])
    torch.save(ck, tmp_path / "trained.pth")
    assert main([str(tmp_path / "trained.pth"), str(tmp_path / "tok.pth")]) == 0
    assert main([str(tmp_path / "trained.pth"), str(tmp_path / "avg.pth"), "--format", "timm-avg"]) == 0
    tok = BaseModel.from_checkpoint(str(tmp_path / "tok.pth"), num_heads=2)
    avg = BaseModel.from_checkpoint(str(tmp_path / "avg.pth"), num_heads=2)
    assert any("fc_norm.*" in n for n in avg.load_report.notes)
    x = torch.randn(2, 3, 32, 32)
    for pool in ("mean", "cls"):
        torch.testing.assert_close(avg.encode(x, pool), tok.encode(x, pool), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------ a model_config damaged by hand
def _damaged(record: dict, how: str):
    if how == "unknown field":
        return {**record, "bogus": 1}
    if how == "missing field":
        return {k: v for k, v in record.items() if k not in ("encoder", "vit")}
    return "abc"  # not a mapping


@pytest.mark.parametrize("how, needle", [
    ("unknown field", "bogus"), ("missing field", "missing"), ("not a mapping", "its model_config is a str"),
])
@pytest.mark.parametrize("kind", ["tec", "mae"])
def test_a_damaged_model_config_is_one_error_line_naming_the_file(tmp_path, ckpt, mae_ckpt, capsys, kind, how,
                                                                  needle):
    path = ckpt if kind == "tec" else mae_ckpt[0]
    ck = torch.load(path, weights_only=True)
    ck["model_config"] = _damaged(ck["model_config"], how)
    bad = tmp_path / "damaged.pth"
    torch.save(ck, bad)
    assert main([str(bad), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: its model_config") and needle in err[0], err
    assert not (tmp_path / "out.pth").exists()


def test_help_names_the_mae_layout_of_format_timm(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "of an MAE training checkpoint: MAE's release layout {'model': encoder}" in " ".join(text.split())
    assert "``" not in text  # the docstring's markup
