"""``python -m tec_fast.eval``: checkpoints of several layouts, demo data and image folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tec_fast import TECConfig, TECModel, ViTConfig
from tec_fast.cli.eval import main
from tec_fast.models.mae import MAEModel

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = MAEModel(VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    path = tmp_path_factory.mktemp("ckpt") / "mae.pth"
    torch.save({"model": model.state_dict()}, path)  # full MAE layout, decoder included
    return path


def test_cli_on_demo_subset(mae_ckpt, tmp_path):
    out = tmp_path / "res" / "eval.json"
    cmd = [sys.executable, "-m", "tec_fast.eval", str(mae_ckpt), "--num-heads", "2",
           "--n-train", "100", "--n-test", "50", "--pixels", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "k-NN top-1" in proc.stdout and "raw pixels" in proc.stdout  # the table
    assert "features train" in proc.stderr  # progress display
    res = json.loads(out.read_text())
    for row in (res, res["pixels"]):
        assert 0.0 <= row["knn"] <= 1.0 and 0.0 <= row["linear"] <= 1.0
    assert res["data"] == {"name": "demo (seed 0)", "train": 100, "test": 50, "classes": 10,
                           "classes_without_train_images": [], "test_images_of_those_classes": 0,
                           "skipped": {"train": 0, "test": 0}, "skipped_files": {"train": [], "test": []}}
    assert res["vit"]["embed_dim"] == 32 and res["vit"]["num_heads"] == 2
    assert res["vit"]["patch_size"] == 8 and res["vit"]["img_size"] == 32  # inferred from weights
    assert "ignored" in res["load_report"]  # the decoder
    assert set(res["timings_s"]) >= {"load_s", "data_s", "features_s", "knn_s", "linear_s"}


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--model", "--embed-dim", "--json", "--pool", "--k"):
        assert flag in text
    assert "in the protocols also the training seed" in " ".join(text.split())  # --seed


def test_stored_config_and_encoder_only_layout(tmp_path):
    torch.manual_seed(0)
    model = MAEModel(VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    path = tmp_path / "enc.pth"
    torch.save({"model": model.encoder_state_dict(), "config": model.config_dict()}, path)
    res = main([str(path), "--n-train", "60", "--n-test", "20", "--quiet", "--pool", "cls"])
    assert res["vit_source"].startswith("read from the checkpoint")
    assert "guessed" not in res["vit_source"]  # the stored config says the head count
    assert res["vit"] == VIT.to_dict() and res["pool"] == "cls"


def test_raw_tec_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = TECConfig(encoder=VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    path = tmp_path / "checkpoint-1.pth"
    torch.save({"model": TECModel(cfg).state_dict(), "epoch": 1}, path)
    res = main([str(path), "--num-heads", "2", "--n-train", "60", "--n-test", "20", "--quiet"])
    assert "cls_token_mlp" in res["load_report"]  # folded into the CLS token


def test_image_folder_data(tmp_path, mae_ckpt):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, colour in (("red", 0), ("blue", 2)):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(40, 48, 3), dtype=np.uint8)
                arr[..., colour] += 180
                Image.fromarray(arr).save(d / f"{i}.jpg")
    res = main([str(mae_ckpt), "--num-heads", "2", "--data", str(tmp_path / "data"), "--workers", "0",
                "--k", "3", "--quiet"])
    assert res["data"]["train"] == 12 and res["data"]["test"] == 6 and res["data"]["classes"] == 2
    assert res["knn"] == 1.0  # colour is trivially separable


def test_errors(tmp_path, mae_ckpt):
    with pytest.raises(ValueError, match="depth=12"):  # the preset contradicts the weights
        main([str(mae_ckpt), "--model", "vit_tiny_patch16", "--img-size", "32", "--quiet"])
    small = ViTConfig(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    path = tmp_path / "small.pth"
    torch.save(MAEModel(small, decoder_dim=16, decoder_depth=1, decoder_heads=2).encoder_state_dict(), path)
    with pytest.raises(ValueError, match="--data demo: the demo images are 32x32"):
        main([str(path), "--num-heads", "2", "--quiet"])
    proc = subprocess.run([sys.executable, "-m", "tec_fast.eval", str(path), "--num-heads", "2", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]  # after the encoder and load lines, which --quiet keeps
    assert proc.returncode == 2 and last.startswith("error: --data demo: the demo images are 32x32")
    with pytest.raises(ValueError, match=r"^--num-heads 3: .*num_heads \(3\)"):  # 32 wide: 3 heads cannot split it
        main([str(path), "--num-heads", "3", "--quiet"])
    proc = subprocess.run([sys.executable, "-m", "tec_fast.eval", str(tmp_path / "nope.pth")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: argument checkpoint:")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, flag", [
    (["--data", "{tmp}"], "--data"),                  # no train/ and val/ inside
    (["--pixels", "--data", "{folder}"], "--pixels"),  # the pixel baseline needs the demo data
    (["--k", "0"], "--k"), (["--n-train", "0"], "--n-train"), (["--batch-size", "-1"], "--batch-size"),
    (["--probe-dim", "-1"], "--probe-dim"), (["--mlp-ratio", "nan"], "--mlp-ratio"),
    (["--num-heads", "0"], "--num-heads"), (["--workers", "-2"], "--workers"), (["--seed", "-1"], "--seed"),
    (["--device", "tpu"], "--device"), (["--json", "{tmp}"], "--json"),
])
def test_flags_refused_at_parse_time(tmp_path, mae_ckpt, capsys, argv, flag):
    folder = tmp_path / "f"
    for split in ("train", "val"):
        (folder / split / "a").mkdir(parents=True)
    argv = [a.format(tmp=tmp_path, folder=folder) for a in argv]
    with pytest.raises(SystemExit) as info:
        main([str(mae_ckpt), "--num-heads", "2", "--quiet", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: argument {flag}:"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_refused_without_cuda(mae_ckpt, capsys):
    with pytest.raises(SystemExit):
        main([str(mae_ckpt), "--device", "cuda", "--quiet"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_nonfinite_weights_refused(tmp_path, mae_ckpt, capsys):
    state = torch.load(mae_ckpt, weights_only=True)["model"]
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="NaN or inf.*blocks.0.attn.qkv.weight"):
        main([str(path), "--num-heads", "2", "--quiet"])
    from tec_fast.cli.eval import cli
    assert cli([str(path), "--num-heads", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "meaningless" in err[0]


def test_num_heads_contradicting_the_stored_config_is_refused(tmp_path, capsys):
    """The stored config says how the weights were trained; another head count changes the scores."""
    from tec_fast.cli.eval import cli

    model = MAEModel(VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    path = tmp_path / "enc.pth"
    torch.save({"model": model.encoder_state_dict(), "config": model.config_dict()}, path)
    for extra in ([], ["--depth", "2"]):  # architecture read from the checkpoint, or set by flags
        assert cli([str(path), "--num-heads", "4", "--n-train", "20", "--n-test", "10", "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {path} records num_heads=2, which --num-heads 4 contradicts; leave --num-heads out"]


def test_quiet_hides_the_progress_only(mae_ckpt, tmp_path, capsys):
    """The load report's unexpected keys and resampled position embedding say what was evaluated."""
    ck = torch.load(mae_ckpt, weights_only=True)
    ck["model"]["some_unknown.weight"] = torch.zeros(3)
    torch.save(ck, tmp_path / "extra.pth")
    main([str(tmp_path / "extra.pth"), "--num-heads", "2", "--img-size", "48", "--data", str(_rgb_folder(tmp_path)),
          "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert "unexpected: some_unknown.weight" in err and "pos_embed resampled from a 4x4 to a 6x6 grid" in err
    assert "features train" not in err


def _rgb_folder(tmp_path):
    from conftest import write_class_folders
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        write_class_folders(tmp_path / "data" / split, ("a", "b"), 2, (40, 48), rng)
    return tmp_path / "data"


@pytest.mark.parametrize("flags,patch,source", [([], 8, "read from the weights"),
                                                (["--patch-size", "8"], 8, "inferred from the weights"),
                                                (["--model", "vit_demo_patch4"], 4, "preset vit_demo_patch4")])
def test_an_img_size_off_the_patch_grid_names_the_flag(mae_ckpt, capsys, flags, patch, source):
    from tec_fast.cli.eval import cli
    assert cli([str(mae_ckpt), "--img-size", "30", "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: argument --img-size: 30 is not a multiple of the encoder's patch size {patch} "
                          f"({source}") and "\n" not in err, err


def test_load_errors_name_the_checkpoint_file(mae_ckpt, tmp_path, capsys):
    from tec_fast.cli.eval import cli
    ck = torch.load(mae_ckpt, weights_only=True)
    del ck["model"]["patch_embed.proj.weight"]
    torch.save(ck, tmp_path / "nopatch.pth")
    assert cli([str(tmp_path / "nopatch.pth"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'nopatch.pth'}: cannot infer the architecture: "
                                               "no patch_embed.proj.weight in the checkpoint; pass --model or "
                                               "--embed-dim/--depth/--num-heads/--patch-size")
    # with architecture flags the file is read by path too: its name, not '<dict>'
    ck = torch.load(mae_ckpt, weights_only=True)
    ck["model"]["blocks.0.ls1.gamma"] = torch.ones(32)  # LayerScale in block 0 only: block 1's is missing
    torch.save(ck, tmp_path / "ls.pth")
    assert cli([str(tmp_path / "ls.pth"), "--patch-size", "8", "--num-heads", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: checkpoint {tmp_path / 'ls.pth'} lacks base-model keys"), err
