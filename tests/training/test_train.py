"""The trainer: schedule, optimizer groups, the sampler's seeds, fit() on both objectives, and
the command lines (train on an image folder, MAE base -> TEC, loader benchmark, export)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from tec_fast import BaseModel
from tec_fast.training import FitConfig, ResumableSampler, fit
from tec_fast.training.optim import build_optimizer, lr_at, param_groups
from tec_fast.presets import vit_preset
from tec_fast.training.objectives import TECObjective
from train_helpers import AugmentedImages, tiny_base, tiny_objective, tiny_tec, tiny_vit

MAE_ARCH = ["--model", "vit_demo_patch4", "--img-size", "32",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]
DEMO_ARCH = [*MAE_ARCH, "--base-model", "vit_demo_patch4"]


# ------------------------------------------------------------------------------ pieces
def test_lr_schedule_warmup_then_half_cosine_to_zero():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.5)  # half way through the cosine
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(10, 100, 10, 1.0, min_lr=0.1) == pytest.approx(1.0)


def test_no_weight_decay_on_biases_norms_and_1d():
    model = tiny_tec()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.norm1.weight" in nd and "blocks.0.attn.qkv.bias" in nd and "norm.bias" in nd
    assert "blocks.0.attn.qkv.weight" in d and "patch_embed.proj.weight" in d and "cls_token" in d
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(d) + len(nd) == sum(1 for _ in model.parameters())


def test_optimizer_says_which_ran():
    model = tiny_tec()
    _, name = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95))
    assert name.startswith("torch.optim.AdamW")
    with pytest.warns(RuntimeWarning, match="apex"):  # apex is not installed here / needs CUDA
        _, name = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), kind="apex")
    assert name.startswith("torch.optim.AdamW")


def test_sample_seeds_change_every_epoch():
    """Each sample's seed (its crop, flip and augmentation) is drawn anew every epoch: the same
    image must not get the same crop in every epoch."""
    from tec_fast.training.sampling import mix_seed
    s = ResumableSampler(list(range(40)), 1, 0, True, seed=5)
    seeds = []
    for epoch in (0, 1):
        s.set_epoch(epoch)
        pairs = dict(s)
        assert all(seed == mix_seed(5, epoch, i) for i, seed in pairs.items())
        seeds.append(pairs)
    assert all(seeds[0][i] != seeds[1][i] for i in range(40))


def test_metrics_log_records_the_mean_of_the_steps_since_the_last_record(tmp_path):
    """metrics.jsonl: every log_every steps, the mean of each metric over those steps (not their
    sum, nor the last step's value)."""
    model = tiny_tec()
    cfg = FitConfig(max_steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=2, progress=False,
                    num_workers=0, output_dir=str(tmp_path))
    res = fit(model, tiny_objective(), AugmentedImages(16), cfg)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"event"' not in line]
    assert [r["step"] for r in steps] == [2, 4]
    for r, part in zip(steps, (res.losses[0:2], res.losses[2:4])):
        assert r["loss"] == pytest.approx(sum(part) / 2, rel=1e-6)
    assert len(set(res.losses)) == 4  # the four losses differ: a sum or a last value would not match


def test_sample_seeds_do_not_depend_on_world_size():
    ds = list(range(40))
    one = ResumableSampler(ds, 1, 0, True, seed=5)
    two = [ResumableSampler(ds, 2, r, True, seed=5) for r in (0, 1)]
    for s in [one, *two]:
        s.set_epoch(3)
    pairs_one = list(one)
    pairs_two = [p for pair in zip(*[list(s) for s in two]) for p in pair]  # interleave ranks
    assert pairs_two == pairs_one
    one.set_epoch(4)
    assert [i for i, _ in one] != [i for i, _ in pairs_one]  # a new permutation per epoch
    full = list(one)
    one.start = 10  # resume 10 samples into the epoch: the same order, the first 10 skipped
    assert list(one) == full[10:] and len(one) == 30


def test_fit_lowers_both_objectives(tmp_path):
    from tec_fast.models.mae import MAEModel
    from tec_fast.training.objectives import MAEObjective

    data = TensorDataset(torch.randn(32, 3, 16, 16), torch.zeros(32, dtype=torch.long))
    cfg = FitConfig(epochs=10, batch_size=8, lr=3e-3, warmup_steps=4, progress=False, seed=0)
    r = fit(tiny_tec(), tiny_objective(), data, cfg)
    assert r.steps == 40 and r.stopped == "completed"
    assert np.mean(r.losses[-5:]) < 0.9 * np.mean(r.losses[:5])
    torch.manual_seed(0)
    mae = MAEModel(tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    r = fit(mae, MAEObjective(0.75, tiny_vit().num_patches), data, cfg)
    assert np.mean(r.losses[-5:]) < 0.9 * np.mean(r.losses[:5])


def test_time_limit_stops_early_and_saves(tmp_path):
    cfg = FitConfig(epochs=1000, batch_size=8, lr=1e-3, warmup_steps=1, time_limit=0.5, progress=False,
                    output_dir=str(tmp_path))
    r = fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), cfg)
    assert r.stopped == "time_limit" and r.steps < r.total_steps
    assert torch.load(r.checkpoint, weights_only=True)["step"] == r.steps


# -------------------------------------------------------------------- command lines
def _image_folder(root, n_per_class=6, size=40, corrupt=True):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / "train" / c, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (size, size + 8 * i, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "train" / c / f"{i}.png")
    if corrupt:
        (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("images"))


def _run(argv):
    from tec_fast.cli.train import main
    return main(argv)


def test_help_is_grouped_by_topic(capsys):
    from tec_fast.cli.train import build_parser
    text = build_parser().format_help()
    for title in ("data:", "model and base:", "optimisation:", "precision and speed:", "checkpointing:",
                  "distributed (under torchrun):", "logging:", "demo (no --data):"):
        assert title in text, title
    assert "mae_vit_large" in text and "1.4" in text  # the recipe table


def test_mae_base_then_tec_from_it_then_export(folder, tmp_path, capsys):
    common = ["--data", str(folder), "--batch-size", "4", "--num-workers", "0", "--max-steps", "3",
              "--no-progress", "--lr", "1e-3", *MAE_ARCH]
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        assert _run(["--objective", "mae", "--output", str(tmp_path / "mae"), *common]) == 0
    mae_enc = tmp_path / "mae" / "encoder_mae.pth"
    assert mae_enc.is_file()

    out = tmp_path / "tec"
    with pytest.warns(RuntimeWarning):
        assert _run(["--base", f"mae_vit_base:{mae_enc}", "--base-model", "vit_demo_patch4", "--output", str(out),
                     *common]) == 0
    text = capsys.readouterr().out
    assert "summary" in text and "3 / 3 (completed)" in text and "1 unreadable images were skipped" in text
    assert "unreadable images  1 (skipped)" in text and "loss (last step)" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    assert records[-1]["unreadable_images"] == 1 and records[-1]["unreadable_files"][0].endswith("broken.jpg")
    assert [r["step"] for r in records if "loss" in r and "event" not in r] == [3]  # log every 20 -> last
    ck = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ck["kind"] == "tec" and ck["base"]["topk"] == 15 and ck["base"]["tau"] == 1.8
    assert ck["args"]["batch_size"] == 4

    # The exported encoder is a base model for the next round (what "sustainable" means here).
    enc = BaseModel(vit_preset("vit_demo_patch4", 32))
    enc.load_checkpoint(str(out / "encoder_timm.pth"))

    from tec_fast.cli.export import main as export_main
    from tec_fast.models.tec import TECModel
    from tec_fast.config import TECConfig
    assert export_main([str(out / "checkpoint-last.pth"), str(tmp_path / "x.pth")]) == 0
    sd = torch.load(tmp_path / "x.pth", weights_only=True)
    tec = TECModel(TECConfig.from_dict(ck["model_config"]))
    tec.load_checkpoint(ck)
    with torch.no_grad():
        assert torch.allclose(sd["cls_token"], tec.cls_embedding(), atol=1e-6)
    assert not any(k.startswith(("cls_token_mlp", "decoder", "encoder_adaptor")) for k in sd)
    assert export_main([str(tmp_path / "mae" / "checkpoint-last.pth"), str(tmp_path / "m.pth")]) == 0
    assert "blocks.0.attn.qkv.weight" in torch.load(tmp_path / "m.pth", weights_only=True)["model"]


def test_strict_data_fails_on_an_unreadable_image(folder, tmp_path, capsys):
    assert _run(["--data", str(folder), "--objective", "mae", "--strict-data", "--batch-size", "4",
                 "--num-workers", "0", "--max-steps", "3", "--no-progress", "--output", str(tmp_path),
                 "--warmup-epochs", "0", *MAE_ARCH]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unreadable image") and "broken.jpg" in err[0]


def test_a_data_error_in_a_loader_worker_ends_the_process(folder, tmp_path):
    """--strict-data with loader workers: the error line, then exit status 2. The persistent
    workers ignore SIGTERM, and with the loader kept alive by the error's traceback the process
    used to hang at exit in multiprocessing's join of them."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tec_fast.train", "--data", str(folder), "--objective", "mae", "--strict-data",
           "--batch-size", "4", "--num-workers", "1", "--max-steps", "3", "--no-progress", "--output",
           str(tmp_path / "run"), "--warmup-epochs", "0", *MAE_ARCH]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: unreadable image" in done.stderr and "broken.jpg" in done.stderr


def test_bench_loader(folder, capsys):
    assert _run(["--data", str(folder), "--objective", "mae", "--bench-loader", "--batch-size", "2",
                 "--num-workers", "0", "--img-size", "32"]) == 0
    assert "img/s" in capsys.readouterr().out


def test_tec_needs_a_base(folder, tmp_path, capsys):
    for extra, expected in (([], "--base KIND:PATH"), (["--base", "nonsense"], "KIND:PATH"),
                            (["--base", f"mae_vit_base:{tmp_path / 'missing.pth'}"], "no such file")):
        with pytest.raises(SystemExit) as info:
            _run(["--data", str(folder), "--output", str(tmp_path), "--num-workers", "0", *extra])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: argument --base:") and expected in err[0], err


def test_a_hugging_face_folder_is_a_base(folder, tmp_path, capsys):
    """--base takes a save_pretrained folder, as BaseModel.from_checkpoint and eval do (it was
    refused as 'no such file'); a folder that is not one is refused naming what it lacks."""
    hf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "bases", "hf_vit")
    assert _run(["--data", str(folder), "--base", f"timm:{hf}", "--img-size", "32", "--output", str(tmp_path),
                 "--print-config"]) == 0
    assert f"base: timm:{hf}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _run(["--data", str(folder), "--base", f"timm:{folder}", "--output", str(tmp_path), "--print-config"])
    assert "a Hugging Face save_pretrained folder" in capsys.readouterr().err


def test_progress_is_plain_text_off_a_terminal():
    import io

    from tec_fast.training.monitor import Progress, table
    buf = io.StringIO()
    p = Progress("tec", total_steps=30, every=10, stream=buf)
    for step in range(1, 31):
        p.update(step, 0, 123.4, {"loss": 1.0 / step}, 1e-4)
    p.close()
    lines = buf.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["1/30", "10/30", "20/30", "30/30"]
    assert "\r" not in buf.getvalue() and "img/s" in lines[0] and "ETA" in lines[0]
    assert table(["a", "b"], [["x", "1"], ["yy", "22"]]).splitlines()[-1] == "yy  22"


def test_variable_and_block_masking_train_through_the_packed_encoder(tmp_path):
    """--mask-ratio LO:HI and --masking block: reproducible masks from the engine's noise, the
    packed encoder, and a falling loss."""
    base = tiny_base()
    data = TensorDataset(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long))
    cfg = FitConfig(epochs=8, batch_size=8, lr=3e-3, warmup_steps=2, progress=False, seed=0)
    L = tiny_vit().num_patches
    for objective in (TECObjective(base, (0.5, 0.9), L), TECObjective(base, 0.5, L, masking="block")):
        assert objective.noise_columns == L + 1  # one extra noise column per image
        r = fit(tiny_tec(), objective, data, cfg)
        assert r.stopped == "completed"
        assert np.mean(r.losses[-3:]) < np.mean(r.losses[:3])
        r2 = fit(tiny_tec(), objective, data, cfg)
        assert r.losses == r2.losses  # masks come from the seeded noise: reproducible


def test_mask_ratio_argument():
    from tec_fast.cli.train import build_parser

    p = build_parser()
    assert p.parse_args(["--mask-ratio", "0.6:0.9"]).mask_ratio == (0.6, 0.9)
    assert p.parse_args(["--mask-ratio", "0.7"]).mask_ratio == 0.7
    for bad in ("1.2", "0.9:0.6", "a:b", "0", "0.0:0.5", "1", "nan"):
        with pytest.raises(SystemExit):
            p.parse_args(["--mask-ratio", bad])


def test_cli_block_masking_run(folder, tmp_path):
    base = BaseModel(vit_preset("vit_demo_patch4", 32))
    torch.save({"model": base.state_dict()}, tmp_path / "base.pth")
    argv = ["--data", str(folder), "--batch-size", "4", "--num-workers", "0", "--max-steps", "2",
            "--no-progress", "--lr", "1e-3", *DEMO_ARCH, "--base", f"mae_vit_base:{tmp_path / 'base.pth'}",
            "--mask-ratio", "0.6:0.9", "--masking", "block", "--output", str(tmp_path / "out")]
    with pytest.warns(RuntimeWarning):
        assert _run(argv) == 0
    ck = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)
    assert ck["args"]["masking"] == "block" and tuple(ck["args"]["mask_ratio"]) == (0.6, 0.9)


def test_resume_of_a_finished_run_into_a_new_output_finishes_cleanly(folder, tmp_path, capsys):
    """Nothing is left to train: said, exit 0, no 'no step records to plot' error from the curves."""
    common = ["--data", str(folder), "--objective", "mae", "--batch-size", "4", "--num-workers", "0",
              "--no-progress", "--lr", "1e-3", *MAE_ARCH]
    with pytest.warns(RuntimeWarning):
        assert _run([*common, "--max-steps", "2", "--output", str(tmp_path / "a")]) == 0
        capsys.readouterr()
        done = tmp_path / "a" / "checkpoint-last.pth"
        assert _run([*common, "--max-steps", "1", "--output", str(tmp_path / "new"), "--resume", str(done)]) == 0
    out, err = capsys.readouterr()
    assert f"--resume {done}: the checkpoint has already completed the schedule (step 2 of 1)" in err
    assert "error" not in err and "2 / 1 (completed)" in out
    assert not (tmp_path / "new" / "curves.png").exists()


def test_unreadable_images_are_those_of_every_process(monkeypatch):
    """Under torchrun each process reads its own share of the images: the run's unreadable images
    are the union of every process's (found under the wrappers' ``.dataset``), not rank 0's alone."""
    import types

    from tec_fast.training import loop
    from tec_fast.training.distributed import DistInfo

    class Images:
        def __init__(self, bad):
            self.bad = bad

        def skipped_paths(self):
            return list(self.bad)

    wrapped = types.SimpleNamespace(dataset=types.SimpleNamespace(dataset=Images(["b.jpg", "a.jpg"])))
    assert loop._unreadable_images(wrapped, DistInfo()) == ["a.jpg", "b.jpg"]

    def gather(out, obj):  # rank 0 met a.jpg and b.jpg, rank 1 c.jpg and a.jpg
        out[:] = [obj, ["c.jpg", "a.jpg"]]
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    assert loop._unreadable_images(wrapped, DistInfo(world=2)) == ["a.jpg", "b.jpg", "c.jpg"]
    assert loop._unreadable_images(types.SimpleNamespace(), DistInfo()) == []  # in-memory data
