"""``python -m tec_fast.cli.train --native-resolution``: images of different sizes and aspect ratios,
token-budget batches from ``packing.plan_bins``, the packed base + new model, checkpoints, exact
resume in the middle of an epoch, a fair share of bins per process, and clear errors for the
modes it does not support."""
from __future__ import annotations

import os
import re
import signal

import numpy as np
import pytest
import torch

from tec_fast import BaseModel, TECConfig, ViTConfig
from tec_fast.data.images import ImageFolderDataset
from tec_fast.training import FitConfig, ResumableBatchSampler, TrainingInterrupted, fit
from tec_fast.native import NativeBatchSampler, NativeTECModel, budget_grid
from tec_fast.training.objectives import NativeTECObjective
from tec_fast.presets import vit_preset

DEMO_ARCH = ["--model", "vit_demo_patch4", "--base-model", "vit_demo_patch4", "--img-size", "32",
             "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]
# (height, width): wide, tall, square, bigger than the budget, smaller than top-k patches (8x8 -> 4)
SIZES = [(40, 40), (20, 60), (64, 16), (8, 8), (28, 36), (24, 24), (16, 24), (12, 48), (36, 20), (44, 30)]
MAX_PATCHES, TOKENS = 32, 80


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("native_images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "base.pth"
    torch.save({"model": BaseModel(vit_preset("vit_demo_patch4", 32)).state_dict()}, path)
    return path


def _run(argv):
    from tec_fast.cli.train import main
    return main(argv)


def test_cli_trains_on_token_budget_batches(folder, base_ckpt, tmp_path, monkeypatch, capsys):
    seen = []
    call = NativeTECObjective.__call__

    def spy(self, model, batch, noise):
        native, per_image = batch
        seen.append((native.num_tokens, list(native.grids), [int(n.shape[0]) for n in per_image]))
        return call(self, model, batch, noise)

    monkeypatch.setattr(NativeTECObjective, "__call__", spy)
    out = tmp_path / "out"
    argv = ["--data", str(folder), "--native-resolution", "--max-patches", str(MAX_PATCHES),
            "--tokens-per-batch", str(TOKENS), "--num-workers", "0", "--max-steps", "3", "--no-progress",
            "--lr", "1e-3", "--warmup-epochs", "0", "--log-every", "1", *DEMO_ARCH, "--base", f"mae_vit_base:{base_ckpt}",
            "--output", str(out)]
    assert _run(argv) == 0
    text = capsys.readouterr().out
    assert "3 / 3 (completed)" in text and "native resolution" in text

    assert len(seen) == 3
    for tokens, grids, noise_lengths in seen:
        assert tokens <= TOKENS  # the token budget, CLS tokens included
        assert tokens == sum(1 + h * w for h, w in grids)
        assert noise_lengths == [h * w for h, w in grids]  # one noise value per patch
        for h, w in grids:
            assert 15 <= h * w <= MAX_PATCHES  # top-k 15 of the mae_vit_base recipe .. budget
    grids = {g for _, gs, _ in seen for g in gs}
    assert any(h != w for h, w in grids)  # aspect ratios kept: non-square grids

    ck = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ck["step"] == 3 and ck["args"]["native_resolution"] and ck["args"]["max_patches"] == MAX_PATCHES
    assert (out / "encoder_timm.pth").is_file()
    records = [__import__("json").loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r, (tokens, grids, _) in zip(steps, seen):
        assert r["fill"] == pytest.approx(tokens / TOKENS)
        assert np.isfinite(r["loss"]) and r["img_per_s"] > 0
    # The checkpoint is an ordinary TEC checkpoint.
    model = NativeTECModel(TECConfig.from_dict(ck["model_config"]))
    model.load_checkpoint(ck)


def test_dataset_grids_follow_the_budget(folder):
    ds = ImageFolderDataset(str(folder), 32, native_patch=4, max_patches=MAX_PATCHES, min_patches=15)
    grids = ds.native_grids()
    for (H, W), g, i in zip(SIZES, grids, range(len(SIZES))):
        if budget_grid(H, W, 4, MAX_PATCHES)[0] * budget_grid(H, W, 4, MAX_PATCHES)[1] >= 15:
            assert g == budget_grid(H, W, 4, MAX_PATCHES)
        else:  # too small for the top-k: enlarged to the budget
            assert g == budget_grid(H, W, 4, MAX_PATCHES, upscale=True)
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 4 * grids[i][0], 4 * grids[i][1])


def _tiny(seed=0):
    torch.manual_seed(seed)
    vit = ViTConfig(32, 4, 32, 2, 2)
    base = BaseModel(vit, last_layers=1, topk=3)
    torch.manual_seed(seed + 1)
    model = NativeTECModel(TECConfig(encoder=vit, decoder_dim=16, decoder_depth=1, decoder_heads=2, tau=1.0))
    return base, model


def _fit(folder, out, **kw):
    ds = ImageFolderDataset(str(folder), 32, native_patch=4, max_patches=24, min_patches=4)
    sizes = [(4 * h, 4 * w) for h, w in ds.native_grids()]
    plan = NativeBatchSampler(sizes, 4, 24, 40, seed=5)
    base, model = _tiny()
    objective = NativeTECObjective(base, 0.75, 4, 40)
    cfg = dict(name="native", output_dir=str(out) if out else None, epochs=2, accum=2, lr=2e-3, warmup_steps=2, seed=5,
               log_every=1, progress=False)
    cfg.update(kw.pop("cfg", {}))
    return fit(model, objective, objective.samples(ds), FitConfig(**cfg), batch_sampler=plan,
               collate_fn=objective.collate, **kw)


def test_resume_mid_epoch_is_exact(folder, tmp_path):
    full = _fit(folder, tmp_path / "full")
    per_epoch = full.total_steps // 2
    assert full.steps == full.total_steps and per_epoch >= 3

    def on_step(step, metrics):  # the signal is seen at the end of the next step
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        _fit(folder, tmp_path / "cut", on_step=on_step)
    part1 = torch.load(info.value.checkpoint, weights_only=True)
    assert part1["step"] == 2 and part1["epoch"] == 0 and part1["step_in_epoch"] == 2  # mid-epoch
    resumed = _fit(folder, tmp_path / "cut", cfg={"resume": "auto", "num_workers": 1})
    assert full.losses[:2] + resumed.losses == full.losses  # bit for bit, every step
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_bins_are_dealt_to_ranks_evenly():
    sizes = [(4 * (1 + i % 5), 4 * (2 + i % 3)) for i in range(40)]
    plan = NativeBatchSampler(sizes, 4, 16, 40, seed=1)
    one = ResumableBatchSampler(plan, 1, 0, seed=1)
    two = [ResumableBatchSampler(NativeBatchSampler(sizes, 4, 16, 40, seed=1), 2, r, seed=1) for r in (0, 1)]
    for s in (one, *two):
        s.set_epoch(2)
    bins = one.batches()
    assert len(two[0].batches()) == len(two[1].batches()) == len(bins) // 2
    interleaved = [b for pair in zip(two[0].batches(), two[1].batches()) for b in pair]
    assert interleaved == bins[:len(interleaved)]  # rank r takes bins r::2 of the same plan
    assert list(two[1])[0] == [(i, s) for i, s in list(one)[1]]  # same per-sample seeds
    one.set_epoch(3)
    assert one.batches() != bins  # re-planned per epoch


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_two_processes_match_one(folder, tmp_path, shard):
    """torchrun, 2 CPU processes (gloo), bins r::2 per rank == 1 process taking the same bins as
    2 accumulation micro-steps: same losses, same weights (gradient sync through the native forward)."""
    import json
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "rank0.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(here, "native_ddp_worker.py"), str(out), str(folder), shard, "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:  # a crashed gloo rendezvous on a loaded machine: retried once
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    two = json.loads(out.read_text())
    one = _fit(folder, None, cfg={"accum": 2})
    assert two["world"] == 2 and two["images_per_step"] == one.global_batch
    assert two["losses"] == pytest.approx(one.losses, rel=1e-5)
    for k, v in one.model.state_dict().items():
        if k.endswith(("qkv.bias", "decoder_qk.bias")):  # zero-up-to-rounding grads (see test_ddp)
            continue
        assert two["weights"][k] == pytest.approx(float(v.double().sum()), rel=1e-4, abs=1e-4), k


@pytest.mark.parametrize("extra,match", [
    (["--objective", "mae"], "objective mae"),
    (["--masking", "block"], "masking block"),
    (["--mask-ratio", "0.6:0.9"], "mask-ratio.*ratio range"),
    (["--max-patches", "4"], "max-patches"),
])
def test_unsupported_combinations_fail_clearly(folder, base_ckpt, tmp_path, extra, match, capsys):
    arch, base = DEMO_ARCH, ["--base", f"mae_vit_base:{base_ckpt}"]
    if "mae" in extra:  # MAE pretrains a base: it takes no base settings
        i = DEMO_ARCH.index("--base-model")
        arch, base = DEMO_ARCH[:i] + DEMO_ARCH[i + 2:], []
    with pytest.raises(SystemExit) as exc:
        _run(["--data", str(folder), "--native-resolution", "--num-workers", "0", "--max-steps", "1",
              "--no-progress", "--output", str(tmp_path), *arch, *base, *extra])
    assert exc.value.code != 0
    assert re.search(match, f"{exc.value.code} {capsys.readouterr().err}"), match
