"""The evaluation protocols of ``python -m tec_fast.eval --protocol linprobe|finetune``: their
pieces against float64 / PIL references (LARS, layer decay, mixup / cutmix, RandAugment's point
ops, drop path), both protocols end to end on tiny data, and the resume of a killed run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import write_class_folders

from tec_fast import ViTConfig
from tec_fast.cli.eval import main
from tec_fast.evaluation.augment import MixupCutmix, RandAugment, TrainTransform, random_erase
from tec_fast.evaluation.finetune import FinetuneModel, drop_path, layer_decay_groups
from tec_fast.evaluation.lars import LARS
from tec_fast.evaluation.protocol import RECIPE_FIELDS, RECIPES, recipe
from tec_fast.models.base import BaseModel

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--num-heads", "2", "--n-train", "64", "--n-test", "32", "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "enc.pth"
    torch.save({"model": BaseModel(VIT, topk=None).state_dict()}, path)
    return path


# ------------------------------------------------------------------------------ pieces
def test_lars_step_matches_a_float64_reference():
    torch.manual_seed(0)
    w, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    gw, gb = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    pw, pb = w.clone().requires_grad_(), b.clone().requires_grad_()
    opt = LARS([pw, pb], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    mu_w = torch.zeros_like(w)
    for _ in range(2):
        pw.grad, pb.grad = gw.clone(), gb.clone()
        opt.step()
        u = gw + 0.1 * w
        u = u * (0.001 * w.norm() / u.norm())          # matrices: decayed and rescaled
        mu_w = 0.9 * mu_w + u
        w = w - 0.5 * mu_w
    torch.testing.assert_close(pw.detach(), w, rtol=0, atol=1e-12)
    # 1-D parameters: plain momentum SGD, no decay, no rescaling
    torch.testing.assert_close(pb.detach(), b - 0.5 * (gb + (0.9 * gb + gb)), rtol=0, atol=1e-12)


def test_layer_decay_groups():
    model = FinetuneModel(BaseModel(VIT, topk=None), num_classes=3, drop_path=0.0)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # depth 2: embeddings layer 0 -> 0.5^3, block i -> 0.5^(2 - i), head / fc_norm -> 1
    assert where[id(named["encoder.patch_embed.proj.weight"])]["lr_scale"] == 0.5 ** 3
    assert where[id(named["encoder.blocks.0.attn.qkv.weight"])]["lr_scale"] == 0.5 ** 2
    assert where[id(named["encoder.blocks.1.mlp.fc1.weight"])]["lr_scale"] == 0.5
    assert where[id(named["head.weight"])]["lr_scale"] == 1.0
    for name in ("encoder.cls_token", "encoder.pos_embed", "head.bias", "fc_norm.weight",
                 "encoder.blocks.0.norm1.weight"):
        assert where[id(named[name])]["weight_decay"] == 0.0, name
    assert where[id(named["head.weight"])]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_mixup_and_cutmix_targets_match_the_images():
    x = torch.arange(4 * 1 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    mix = MixupCutmix(3, mixup_alpha=1.0, cutmix_alpha=0.0, smoothing=0.0)
    out, t = mix(x, y, np.random.default_rng(1))
    lam = float(np.random.default_rng(1).beta(1.0, 1.0))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(t[1], torch.tensor([0.0, lam, 1 - lam]))
    cut = MixupCutmix(3, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.1)
    out, t = cut(x, y, np.random.default_rng(3))
    pasted = float((out != x).float().mean())  # every pixel differs from its partner's here
    lam = 1 - pasted
    off = 0.1 / 3
    expect = torch.full((3,), off)
    expect[1] += lam * 0.9
    expect[2] += (1 - lam) * 0.9
    torch.testing.assert_close(t[1], expect)
    torch.testing.assert_close(t.sum(1), torch.ones(4))


def _pil_image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)


@pytest.mark.parametrize("op,pil", [
    ("auto_contrast", lambda im, ImageOps: ImageOps.autocontrast(im)),
    ("equalize", lambda im, ImageOps: ImageOps.equalize(im)),
    ("invert", lambda im, ImageOps: ImageOps.invert(im)),
    ("posterize", lambda im, ImageOps: ImageOps.posterize(im, 4 - int(0.6 * 4))),
    ("solarize", lambda im, ImageOps: ImageOps.solarize(im, 256 - int(0.6 * 256))),
])
def test_randaugment_point_ops_match_pil(op, pil):
    Image = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    a = _pil_image()
    expect = np.asarray(pil(Image.fromarray(a), ImageOps))
    img = torch.from_numpy(a).permute(2, 0, 1).float() / 255.0
    got = (getattr(RandAugment(), op)(img, 0.6) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1, op


def test_augmentations_keep_shape_and_range():
    torch.manual_seed(0)
    ra = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5, fill=(0.5, 0.5, 0.5), prob=1.0)
    img = torch.rand(3, 16, 16)
    for op in RandAugment.OPS:
        out = getattr(ra, op)(img, 1.0)
        assert out.shape == img.shape and float(out.min()) >= 0 and float(out.max()) <= 1, op
    t = TrainTransform((0.5,) * 3, (0.25,) * 3, rand_augment=ra, reprob=1.0)
    assert t(torch.randn(3, 16, 16)).shape == (3, 16, 16)
    x = torch.zeros(3, 16, 16)
    erased = random_erase(x, 1.0)
    assert 0 < int((erased != 0).any(0).sum()) < 16 * 16  # one box, not the whole image


def test_drop_path_keeps_or_drops_whole_samples():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2)
    out = drop_path(x, 0.25)
    per_sample = out.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))
    assert abs(float(out.mean()) - 1.0) < 0.05  # unbiased in expectation (4000 samples)
    model = FinetuneModel(BaseModel(VIT, topk=None), num_classes=3, drop_path=0.9).eval()
    torch.nn.init.normal_(model.head.weight)
    images = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(model(images), model(images))  # eval: no dropping
    assert model.drop_rates == [0.0, 0.9]  # rising linearly to the last block
    model.train()
    assert not torch.allclose(model(images), model.eval()(images))  # train: the hooks drop branches


def test_recipes_are_the_papers_and_every_field_is_a_flag():
    lp, ft = RECIPES["linprobe"], RECIPES["finetune"]
    assert (lp.batch_size, lp.blr, lp.epochs, lp.warmup_epochs, lp.weight_decay, lp.pool) == \
        (16384, 0.1, 90, 10, 0.0, "cls")
    assert (ft.layer_decay, ft.drop_path, ft.mixup, ft.cutmix, ft.smoothing, ft.epochs, ft.randaug_n,
            ft.randaug_m) == (0.65, 0.1, 0.8, 1.0, 0.1, 100, 2, 9.0)
    from tec_fast.cli.eval import build_parser
    dests = {a.dest for a in build_parser()._actions}
    assert set(RECIPE_FIELDS) <= dests
    assert recipe("finetune", epochs=3, mixup=None).epochs == 3
    with pytest.raises(ValueError, match="protocol must be one of"):
        recipe("knn")


@pytest.mark.parametrize("argv,needle", [
    (["--protocol", "linprobe", "--mixup", "0.5"], "--mixup: applies to --protocol finetune only"),
    (["--epochs", "3"], "--epochs: applies to --protocol linprobe / finetune"),
    (["--protocol", "finetune", "--k", "5"], "--k: applies to the quick probe only"),
    (["--protocol", "finetune", "--drop-path", "1"], "--drop-path: must be in [0, 1)"),
])
def test_bad_protocol_flags_are_one_error_line(ckpt, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main([str(ckpt), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_batch_larger_than_the_data_is_refused(ckpt, tmp_path, capsys):
    from tec_fast.cli.eval import cli
    assert cli([str(ckpt), "--protocol", "linprobe", *TINY[:6], "--quiet", "--output", str(tmp_path)]) == 2
    assert "larger than the training split (64 images)" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("protocol", ["linprobe", "finetune"])
def test_protocol_runs_on_tiny_data(ckpt, tmp_path, protocol, capsys):
    out = tmp_path / protocol
    out.mkdir()
    (out / ".tmp-killed01.pth").write_bytes(b"half a checkpoint")  # left by a save that was killed
    res = main([str(ckpt), "--protocol", protocol, *TINY, "--epochs", "2", "--warmup-epochs", "1",
                "--output", str(out), "--log-every", "1"])
    assert res["steps"] == res["total_steps"] == 2 * (64 // 16) and res["stopped"] == "completed"
    assert 0.0 <= res["top1"] <= 1.0 and res["test_images"] == 32 and res["num_classes"] == 10
    saved = json.loads((out / "results.json").read_text())
    assert saved["top1"] == res["top1"] and saved["recipe"]["batch_size"] == 16
    assert "LARS" in saved["optimizer"] if protocol == "linprobe" else "layer decay 0.65" in saved["optimizer"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("time,stage,step") and len(rows) == 1 + res["steps"]
    assert (out / "checkpoint-last.pth").is_file()
    assert not (out / ".tmp-killed01.pth").exists()
    assert "removed 1 temporary file(s) left by an interrupted save" in capsys.readouterr().out
    ck = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert ck["protocol"] == protocol and ck["step"] == res["steps"]
    if res.get("curves"):
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    argv = [str(ckpt), "--protocol", protocol, *TINY, "--epochs", "1", "--warmup-epochs", "0", "--output", str(out)]
    with pytest.raises(ValueError, match="holds an earlier run's checkpoints"):  # a second fresh run would
        main(argv)                                                                  # overwrite this one's
    assert main(argv + ["--overwrite"])["steps"] == 64 // 16
    starts = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1  # the earlier run's log went with its checkpoints


def _run(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "tec_fast.eval", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_a_killed_finetune_run_resumes_to_the_uninterrupted_result(ckpt, tmp_path):
    common = [str(ckpt), "--protocol", "finetune", *TINY, "--epochs", "10", "--warmup-epochs", "1",
              "--save-every-steps", "2", "--workers", "0"]
    killed = tmp_path / "killed"
    proc = _run(common + ["--output", str(killed)])
    deadline = time.time() + 240
    log = killed / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:  # kill -9 once a mid-run checkpoint is on disk
        if log.is_file() and '"event": "checkpoint"' in log.read_text():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    first = torch.load(killed / "checkpoint-last.pth", weights_only=False)["step"]
    assert 0 < first < 40
    proc = _run(common + ["--output", str(killed), "--resume"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    starts = [json.loads(line) for line in log.read_text().splitlines() if '"event": "start"' in line]
    assert starts[-1]["step"] >= first and starts[-1]["resumed_from"].endswith("checkpoint-last.pth")
    whole = main(common + ["--output", str(tmp_path / "whole")])
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["steps"] == whole["steps"] == 40
    a = torch.load(killed / "checkpoint-last.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "whole" / "checkpoint-last.pth", weights_only=False)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed["top1"] == whole["top1"]


def test_linprobe_under_torchrun_two_processes(ckpt, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tec_fast.eval", str(ckpt), "--protocol", "linprobe", *TINY, "--epochs", "1",
           "--warmup-epochs", "0", "--workers", "0", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:  # a crashed gloo launch or teardown on a loaded machine: retried once
        out = tmp_path / "ddp_again"
        proc = subprocess.run(cmd[:-1] + [str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world"] == 2 and res["global_batch"] == 16 and res["steps"] == 64 // 16
    assert proc.stdout.count("summary") == 1  # rank 0 alone prints and writes


def test_linprobe_on_an_image_folder(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        write_class_folders(tmp_path / "data" / split, ("cat", "dog", "emu"), 4, (40, 48), rng)
    res = main([str(ckpt), "--num-heads", "2", "--data", str(tmp_path / "data"), "--protocol", "linprobe",
                "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--quiet",
                "--output", str(tmp_path / "out")])
    assert res["num_classes"] == 3 and res["train_images"] == 12 and res["test_images"] == 12
    assert res["steps"] == 3 and 0.0 <= res["top1"] <= 1.0


def test_resume_of_a_finished_finetune_into_a_new_output_scores_it(ckpt, tmp_path, capsys):
    """Nothing is left to train: said, the resumed model is scored, no 'no step records' error."""
    common = [str(ckpt), "--protocol", "finetune", *TINY, "--warmup-epochs", "0", "--workers", "0"]
    main(common + ["--max-steps", "2", "--output", str(tmp_path / "a")])
    capsys.readouterr()
    done = tmp_path / "a" / "checkpoint-last.pth"
    res = main(common + ["--max-steps", "1", "--output", str(tmp_path / "new"), "--resume", str(done)])
    assert res["steps"] == 2 and res["total_steps"] == 1 and res["curves"] is None
    assert f"--resume {done}: the checkpoint has already completed the schedule (step 2 of 1)" in \
        capsys.readouterr().err
    assert json.loads((tmp_path / "new" / "results.json").read_text())["top1"] == res["top1"]


def test_resume_with_another_encoder_file_is_refused(ckpt, tmp_path, capsys):
    """The resume goes on with the encoder weights of its checkpoint: given another encoder file,
    results.json would file one encoder's top-1 under the other's name."""
    from tec_fast.cli.eval import cli
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    torch.save({"model": BaseModel(VIT, topk=None).state_dict()}, other)
    out = tmp_path / "lp"
    common = ["--protocol", "linprobe", *TINY, "--warmup-epochs", "0", "--workers", "0", "--output", str(out)]
    assert cli([str(ckpt), *common, "--epochs", "1"]) == 0
    first = (out / "results.json").read_text()
    capsys.readouterr()
    assert cli([str(other), *common, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the encoder and load lines
    assert err.startswith("error: --resume "), err
    assert f"evaluates the encoder {ckpt}, this run was given {other}, which holds other weights" in err
    assert f"resume with the encoder it records, or evaluate {other} in another --output" in err
    assert (out / "results.json").read_text() == first
    assert torch.load(out / "checkpoint-last.pth", weights_only=False)["encoder_source"] == str(ckpt)


def test_resume_after_the_encoder_file_moved(ckpt, tmp_path):
    """The same weights under another path (the file moved to another disk, a copy) are the same
    encoder: the resume goes on (it was refused: the paths were compared)."""
    import shutil

    from tec_fast.cli.eval import cli
    out = tmp_path / "lp"
    common = ["--protocol", "linprobe", *TINY, "--warmup-epochs", "0", "--workers", "0", "--output", str(out)]
    first = tmp_path / "first.pth"
    shutil.copy(ckpt, first)
    assert cli([str(first), *common, "--epochs", "1"]) == 0
    moved = tmp_path / "elsewhere" / "moved.pth"
    moved.parent.mkdir()
    shutil.move(first, moved)
    assert cli([str(moved), *common, "--epochs", "2", "--resume"]) == 0
    ck = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert ck["epoch"] == 2 and ck["encoder_source"] == str(moved)


def test_a_test_split_with_no_readable_image_is_an_error(ckpt, tmp_path, capsys):
    """Not a top-1 of 0.00%: an error naming the split's folder, and no results.json."""
    from tec_fast.cli.eval import cli
    write_class_folders(tmp_path / "data" / "train", ("cat", "dog"), 4, (40, 48), np.random.default_rng(0))
    for name in ("cat", "dog"):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        (tmp_path / "data" / "val" / name / "a.jpg").write_bytes(b"")
    out = tmp_path / "out"
    assert cli([str(ckpt), "--num-heads", "2", "--data", str(tmp_path / "data"), "--protocol", "linprobe",
                "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--quiet",
                "--output", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    val = str(tmp_path / "data" / "val")
    assert last.startswith(f"error: none of the 2 test images under {val!r} is readable: no top-1 to report "
                           f"(the trained model is in {out}"), last
    assert not (out / "results.json").exists() and (out / "checkpoint-last.pth").is_file()


def test_a_protocol_shows_progress_while_it_scores_the_test_split(ckpt, tmp_path, capsys):
    main([str(ckpt), "--protocol", "linprobe", *[a for a in TINY if a != "--quiet"], "--epochs", "1",
          "--warmup-epochs", "0", "--workers", "0", "--output", str(tmp_path / "lp")])
    err = capsys.readouterr().err
    assert "top-1 test       32/32 images" in err, err[-2000:]


@pytest.fixture(scope="module")
def protocol_checkpoints(ckpt, tmp_path_factory):
    """{protocol: checkpoint-last.pth} of a linear probe (CLS pool) and a fine-tuning (global
    pool: the encoder's final norm replaced by fc_norm), one step each."""
    out = tmp_path_factory.mktemp("protocols")
    for protocol in ("linprobe", "finetune"):
        main([str(ckpt), "--protocol", protocol, *TINY, "--max-steps", "1", "--warmup-epochs", "0",
              "--workers", "0", "--output", str(out / protocol)])
    return {p: out / p / "checkpoint-last.pth" for p in ("linprobe", "finetune")}


def test_a_protocol_checkpoint_reads_as_an_encoder(protocol_checkpoints):
    """eval, train --base (both read_base_weights) and BaseModel.from_checkpoint take its
    encoder.* (and a fine-tuning's fc_norm as the final norm) with the encoder_config it records."""
    from tec_fast.checkpoint import read_base_weights
    for protocol, path in protocol_checkpoints.items():
        ck = torch.load(path, weights_only=False)
        weights = read_base_weights(str(path))
        assert weights.stored == ck["encoder_config"]
        assert sorted(weights.report.ignored) == sorted(k for k in ck["model"] if k.startswith(("head.", "bn.")))
        base = BaseModel.from_checkpoint(str(path))
        assert base.config.to_dict() == ck["encoder_config"]
        for key, value in base.state_dict().items():
            stored = "fc_norm" + key[len("norm"):] if key.startswith("norm.") and protocol == "finetune" \
                else "encoder." + key
            torch.testing.assert_close(value, ck["model"][stored], rtol=0, atol=0, msg=key)
        res = main([str(path), "--n-train", "64", "--n-test", "32", "--quiet"])
        assert res["load_report"].startswith(f"loaded {len(base.state_dict())} tensors from {path}")
        assert f"eval --protocol {protocol} checkpoint" in res["load_report"]
        # with architecture flags: the same reading, the file named (not '<dict>')
        res = main([str(path), "--patch-size", "8", "--n-train", "64", "--n-test", "32", "--quiet"])
        assert res["load_report"].startswith(f"loaded {len(base.state_dict())} tensors from {path}")


def test_a_protocol_checkpoint_exports_its_encoder(protocol_checkpoints, tmp_path, capsys):
    from tec_fast.cli.export import main as export
    ck = torch.load(protocol_checkpoints["linprobe"], weights_only=False)
    assert export([str(protocol_checkpoints["linprobe"]), str(tmp_path / "lp.pth")]) == 0
    assert "eval --protocol linprobe run; left out: bn.*, head.*" in capsys.readouterr().out
    enc = torch.load(tmp_path / "lp.pth", weights_only=True)
    assert sorted(enc) == sorted(k[len("encoder."):] for k in ck["model"] if k.startswith("encoder."))
    for key, value in enc.items():
        assert torch.equal(value, ck["model"]["encoder." + key]), key
    # a fine-tuning's final norm normalises the pooled mean: timm's global_pool='avg' layout only
    ft = protocol_checkpoints["finetune"]
    ck = torch.load(ft, weights_only=False)
    assert export([str(ft), str(tmp_path / "ft.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ft}: ") and "use --format timm-avg" in err and "\n" not in err
    assert export([str(ft), str(tmp_path / "ft.pth"), "--format", "timm-avg"]) == 0
    enc = torch.load(tmp_path / "ft.pth", weights_only=True)
    assert not any(k.startswith("norm.") for k in enc)
    for key, value in enc.items():
        assert torch.equal(value, ck["model"][key if key.startswith("fc_norm.") else "encoder." + key]), key


def test_protocol_counts_every_process_unreadable_images(monkeypatch):
    """Under torchrun each process reads its own share of either split. The training split's
    unreadable images come from every process as fit gathered them (the summary counted rank 0's
    alone once); the test split's are gathered here, once."""
    import torch.distributed as dist

    from tec_fast.cli.eval import _protocol_skipped

    class Split:
        def __init__(self, paths):
            self.paths = paths

        def skipped_paths(self):
            return list(self.paths)

    gathers = []

    def all_gather_object(out, obj):
        gathers.append(list(obj))
        out[:] = [obj, ["/d/val/y.jpg"]]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    fit_gathered = ["/d/train/a.jpg", "/d/train/b.jpg", "/d/train/c.jpg"]
    got = _protocol_skipped(fit_gathered, Split(["/d/val/x.jpg"]))
    assert gathers == [["/d/val/x.jpg"]]
    assert got["skipped"] == {"train": 3, "test": 2}
    assert got["skipped_files"] == {"train": fit_gathered, "test": ["/d/val/x.jpg", "/d/val/y.jpg"]}


def test_run_protocol_reports_the_unreadable_training_images_fit_met(monkeypatch):
    """The training split's unreadable images of a protocol run are fit's (every process's)."""
    from types import SimpleNamespace

    import tec_fast.training as training
    from tec_fast.evaluation.protocol import run_protocol

    def fake_fit(model, objective, dataset, cfg, **kw):
        return SimpleNamespace(model=model, unreadable=["/d/train/b.jpg", "/d/train/q.jpg"], steps=0,
                               total_steps=0, stopped="completed", epoch=0, global_batch=cfg.batch_size,
                               lr=0.0, optimizer="sgd", img_per_s=0.0, metrics={}, checkpoint=None)

    monkeypatch.setattr(training, "fit", fake_fit)
    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    data = [(torch.randn(3, 32, 32), i % 3) for i in range(4)]
    got = run_protocol("linprobe", BaseModel(vit, topk=None), data, data, 3, recipe("linprobe", batch_size=4),
                       (0.5,) * 3, (0.25,) * 3, {"device": "cpu", "output_dir": None, "seed": 0})
    assert got["train_unreadable"] == ["/d/train/b.jpg", "/d/train/q.jpg"]
