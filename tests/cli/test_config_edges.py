"""Configuration values at their edges: the model dataclasses' bool fields and derived defaults;
values of a ``--config`` YAML file checked exactly as the flag would check them (a switch takes
true or false only, a value flag one value, not a bare true); the bounds of the flag types; and
the train command's cross-flag checks, from the command line and from a config file."""
from __future__ import annotations

import pytest

yaml = pytest.importorskip("yaml")

from tec_fast import TECConfig, ViTConfig  # noqa: E402
from tec_fast.cli import train as T  # noqa: E402
from tec_fast.cli.config import config_values  # noqa: E402

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture()
def run_files(tmp_path):
    """A data folder and a base checkpoint (the flag checks read the base's architecture)."""
    import torch

    from tec_fast import BaseModel
    from tec_fast.presets import vit_preset
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    torch.save({"model": BaseModel(vit_preset("vit_demo_patch4", 32)).state_dict()}, tmp_path / "base.pth")
    return tmp_path


def _tec_argv(root):
    return ["--data", str(root / "data"), "--base", f"mae_vit_base:{root / 'base.pth'}", "--model", "vit_demo_patch4",
            "--img-size", "32"]


def _mae_argv(root):
    return ["--data", str(root / "data"), "--objective", "mae", "--model", "vit_demo_patch4", "--img-size", "32"]


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        T.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


# ---- the model dataclasses -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["class_token", "no_embed_class", "layer_scale", "pre_norm", "patch_bias",
                                  "qkv_bias"])
@pytest.mark.parametrize("value", [1, "no", None])
def test_vit_bool_fields_take_only_bools(name, value):
    with pytest.raises(ValueError, match=rf"^ViTConfig\.{name} must be a bool, got {value!r}$"):
        ViTConfig(**TINY, **{name: value})


def test_tec_pred_heads_default_to_the_encoders_heads():
    cfg = TECConfig(encoder=ViTConfig(**TINY), decoder_dim=16, decoder_depth=1, decoder_heads=4)
    assert (cfg.pred_dim, cfg.pred_heads) == (32, 2)
    cfg = TECConfig(encoder=ViTConfig(**TINY), decoder_dim=16, decoder_depth=1, decoder_heads=4, pred_heads=8)
    assert (cfg.pred_dim, cfg.pred_heads) == (32, 8)


# ---- --config values -------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1, 0, "true"])
def test_config_switch_takes_only_true_or_false(value):
    p = T.build_parser()
    with pytest.raises(ValueError, match=rf"^f: key 'no-progress' \(--no-progress\): expected true or false, "
                                         rf"got {value!r}$"):
        config_values(p, {"no-progress": value}, "f")
    assert config_values(p, {"no-progress": False}, "f") == {"no_progress": False}


@pytest.mark.parametrize("key, flag", [("output", "--output"), ("batch-size", "--batch-size")])
def test_config_value_flag_refuses_a_bare_true(key, flag):
    p = T.build_parser()
    for value in (True, False):
        with pytest.raises(ValueError, match=rf"^f: key '{key}' \({flag}\): expected one value as the flag "
                                             rf"takes, got {value!r}$"):
            config_values(p, {key: value}, "f")


# ---- flag types ------------------------------------------------------------------------------

def test_mask_ratio_range_may_have_equal_ends():
    from tec_fast.cli.flags import mask_ratio
    assert mask_ratio("0.6:0.6") == (0.6, 0.6)
    assert config_values(T.build_parser(), {"mask-ratio": "0.7:0.7"}, "f") == {"mask_ratio": (0.7, 0.7)}


def test_mask_ratio_takes_at_most_two_ends():
    import argparse

    from tec_fast.cli.flags import mask_ratio
    with pytest.raises(argparse.ArgumentTypeError, match=r"^mask ratios must be in \(0, 1\) and LO <= HI, "
                                                         r"got '0.5:0.6:0.7'$"):
        mask_ratio("0.5:0.6:0.7")
    with pytest.raises(ValueError, match=r"^f: key 'mask-ratio' \(--mask-ratio\): mask ratios must be in"):
        config_values(T.build_parser(), {"mask-ratio": "0.5:0.6:0.7"}, "f")


def test_seed_upper_bound_is_inclusive():
    import argparse

    from tec_fast.cli.flags import SEED
    assert SEED(str(2 ** 63 - 1)) == 2 ** 63 - 1
    with pytest.raises(argparse.ArgumentTypeError, match=rf"^must be in \[0, {2 ** 63 - 1}\], got {2 ** 63}$"):
        SEED(str(2 ** 63))
    with pytest.raises(ValueError, match=rf"^f: key 'seed' \(--seed\): must be in \[0, {2 ** 63 - 1}\]"):
        config_values(T.build_parser(), {"seed": 2 ** 63}, "f")


# ---- the train command's cross-flag checks ---------------------------------------------------

def test_min_lr_may_equal_the_peak_lr(run_files, capsys):
    args = T.parse_args(_tec_argv(run_files) + ["--lr", "1e-3", "--min-lr", "1e-3"])
    assert args.lr == args.min_lr == 1e-3
    err = _error(capsys, _tec_argv(run_files) + ["--lr", "1e-3", "--min-lr", "2e-3"])
    assert err.startswith("error: argument --min-lr: 0.002 is above the peak --lr 0.001"), err


def test_mae_objective_refuses_tau_from_the_command_line_and_a_config_file(run_files, capsys):
    err = _error(capsys, _mae_argv(run_files) + ["--tau", "2"])
    assert err.startswith("error: argument --tau: is a TEC setting; --objective mae pretrains a base without one"), err
    cfg = run_files / "run.yaml"
    cfg.write_text("objective: mae\ntau: 2\n")
    err = _error(capsys, ["--config", str(cfg)] + [a for a in _mae_argv(run_files) if a not in ("--objective", "mae")])
    assert err.startswith("error: argument --tau: is a TEC setting"), err


def test_tokens_per_batch_without_native_resolution_is_refused(run_files, capsys):
    err = _error(capsys, _tec_argv(run_files) + ["--tokens-per-batch", "4096"])
    assert err.startswith("error: argument --tokens-per-batch: applies to --native-resolution only"), err
