"""Checkpoints and --resume: an interrupted + resumed run equals the uninterrupted one, bit for
bit on CPU (model, optimizer state, losses), whatever the worker count of either part."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from tec_fast.training import (CheckpointManager, FitConfig, TrainingInterrupted, fit, rng_state,
                             set_rng_state)
from train_helpers import AugmentedImages, tiny_objective, tiny_tec


def _cfg(out, **kw):
    base = dict(name="tec", output_dir=str(out), epochs=3, batch_size=4, accum=2, lr=2e-3, warmup_steps=3,
                seed=7, log_every=1, progress=False)
    base.update(kw)
    return FitConfig(**base)


def _sigterm_at(step_to_signal):
    def on_step(step, metrics):
        if step == step_to_signal:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_step


def _run_interrupted(out, workers_second: int, precision: str = "fp32"):
    """SIGTERM during step 4; the loop finishes the step it is in, saves, raises."""
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny_tec(), tiny_objective(), AugmentedImages(), _cfg(out, precision=precision),
            on_step=_sigterm_at(4))
    first = info.value
    assert first.signum == signal.SIGTERM and first.checkpoint and os.path.isfile(first.checkpoint)
    part1 = torch.load(first.checkpoint, weights_only=True)
    resumed = fit(tiny_tec(seed=99), tiny_objective(), AugmentedImages(),
                  _cfg(out, resume="auto", num_workers=workers_second, precision=precision))
    return part1, resumed


def _assert_same_state(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("workers_second", [0, 2])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, workers_second):
    # 48 images / batch 4 / accum 2 = 6 steps per epoch, 18 in all; the stop (step 5) is mid-epoch.
    full = fit(tiny_tec(), tiny_objective(), AugmentedImages(), _cfg(tmp_path / "full"))
    part1, resumed = _run_interrupted(tmp_path / "cut", workers_second)
    assert part1["step"] == 5 and part1["epoch"] == 0 and part1["step_in_epoch"] == 5
    assert resumed.steps == full.steps == 18
    losses_before = [full.losses[i] for i in range(part1["step"])]
    assert losses_before + resumed.losses == full.losses  # exact float equality, every step
    _assert_same_state(full.model.state_dict(), resumed.model.state_dict(), "model")
    last_full = torch.load(full.checkpoint, weights_only=True)
    last_cut = torch.load(resumed.checkpoint, weights_only=True)
    for pid, st in last_full["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, last_cut["optimizer"]["state"][pid][k]), f"optimizer {pid}.{k}"


class _RandomWeightObjective:
    """The tiny TEC objective with its loss scaled by a draw from torch's global RNG in the main
    process each step (as dropout or stochastic depth draw): a resume that does not restore the
    global RNG state gives other scales, and other weights."""

    def __init__(self, inner=None):
        self.inner = inner if inner is not None else tiny_objective()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def for_precision(self, amp_dtype):
        return _RandomWeightObjective(self.inner.for_precision(amp_dtype))

    def __call__(self, model, batch, noise):
        out = self.inner(model, batch, noise)
        return {**out, "loss": out["loss"] * (0.5 + torch.rand(()))}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_restores_the_global_rng(tmp_path, workers):
    """Code drawing from torch's global RNG in the main process (dropout in a user's model) draws
    the same after a resume: the RNG state is restored, and no DataLoader iterator takes a draw
    from it (each takes its workers' seed from the loader's own generator)."""
    full = fit(tiny_tec(), _RandomWeightObjective(), AugmentedImages(), _cfg(tmp_path / "full"))
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny_tec(), _RandomWeightObjective(), AugmentedImages(), _cfg(tmp_path / "cut"),
            on_step=_sigterm_at(4))
    step = torch.load(info.value.checkpoint, weights_only=True)["step"]
    torch.manual_seed(12345)  # the resuming process starts from another RNG state
    resumed = fit(tiny_tec(seed=99), _RandomWeightObjective(), AugmentedImages(),
                  _cfg(tmp_path / "cut", resume="auto", num_workers=workers))
    assert full.losses[:step] + resumed.losses == full.losses
    _assert_same_state(full.model.state_dict(), resumed.model.state_dict(), "model")


def test_fp16_loss_scaler_is_saved_and_restored(tmp_path):
    full = fit(tiny_tec(), tiny_objective(), AugmentedImages(), _cfg(tmp_path / "full", precision="fp16"))
    part1, resumed = _run_interrupted(tmp_path / "cut", 0, precision="fp16")
    assert part1["scaler"] is not None and part1["scaler"]["scale"] > 0
    assert full.losses[:part1["step"]] + resumed.losses == full.losses
    _assert_same_state(full.model.state_dict(), resumed.model.state_dict(), "model")
    # the scaler's whole state goes on (its growth tracker counts the steps since the last
    # change: a fresh scaler would restart it, and change its scale at another step)
    assert torch.load(resumed.checkpoint, weights_only=True)["scaler"] == \
        torch.load(full.checkpoint, weights_only=True)["scaler"]


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    r = fit(tiny_tec(), tiny_objective(), AugmentedImages(), _cfg(tmp_path, epochs=1),
            checkpoint_extra={"kind": "tec", "model_config": tiny_tec().config.to_dict()})
    ck = torch.load(r.checkpoint, weights_only=True)
    for key in ("model", "optimizer", "scaler", "step", "epoch", "step_in_epoch", "schedule", "rng",
                "fit_config", "kind", "model_config", "format"):
        assert key in ck, key
    assert ck["step"] == 6 and ck["epoch"] == 1 and ck["step_in_epoch"] == 0
    assert ck["fit_config"]["batch_size"] == 4 and ck["schedule"]["total_steps"] == 6
    # The engine's own checkpoint is a valid TEC checkpoint for the model loader.
    m = tiny_tec(seed=5)
    m.load_checkpoint(r.checkpoint)
    _assert_same_state(m.state_dict(), r.model.state_dict(), "reloaded model")


def test_rng_state_round_trip():
    import random

    import numpy as np
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_keep_last_and_every_kth_epoch(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2, keep_every=3)
    for epoch in range(1, 8):
        mgr.save({"epoch": epoch}, epoch_done=epoch)
    files = sorted(f for f in os.listdir(tmp_path) if f.startswith("checkpoint"))
    assert files == ["checkpoint-0003.pth", "checkpoint-0006.pth", "checkpoint-0007.pth",
                     "checkpoint-last.pth"]
    assert torch.load(mgr.last, weights_only=True)["epoch"] == 7
    mgr.save({"epoch": 8})  # mid-epoch save: only checkpoint-last changes, epoch 7's file is intact
    assert torch.load(mgr.last, weights_only=True)["epoch"] == 8
    assert torch.load(tmp_path / "checkpoint-0007.pth", weights_only=True)["epoch"] == 7
    assert not [f for f in os.listdir(tmp_path) if f.startswith((".tmp", ".link"))]


def test_resume_auto_without_checkpoint_says_so_and_starts_fresh(tmp_path, capsys):
    r = fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), _cfg(tmp_path, epochs=1, resume="auto", warmup_steps=0))
    assert r.steps == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "checkpoint-last.pth does not exist" in err and "step 0" in err
    fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), _cfg(tmp_path, epochs=2, resume="auto", warmup_steps=0))
    assert "nothing to resume" not in capsys.readouterr().err  # the second run found the first's


def test_resume_on_other_data_with_the_same_length_warns(tmp_path):
    """--max-steps fixes the schedule's length whatever the data: resumed on a data set of another
    size, the total steps and global batch agree but the epochs do not, so the run cannot go on as
    the uninterrupted one would have; a warning says so (it went on silently)."""
    with pytest.raises(TrainingInterrupted):
        fit(tiny_tec(), tiny_objective(), AugmentedImages(n=32), _cfg(tmp_path, max_steps=6, accum=1, warmup_steps=0),
            on_step=_sigterm_at(1))
    with pytest.warns(RuntimeWarning, match=r"resuming with 4 steps per epoch where the checkpoint had 8"):
        r = fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16),
                _cfg(tmp_path, max_steps=6, accum=1, resume="auto", warmup_steps=0))
    assert r.steps == 6


def test_resume_of_an_older_epoch_beside_later_ones_is_refused(tmp_path):
    """Resumed from epoch 1 into a folder holding epochs 2 and 3, the run would write its epoch
    files beside the old ones and prune by number (keeping the old run's); it is refused, and
    the same checkpoint resumes in a folder of its own."""
    fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), _cfg(tmp_path, epochs=3, warmup_steps=0, keep_last=5))
    first = tmp_path / "checkpoint-0001.pth"
    with pytest.raises(ValueError, match=r"holds checkpoints of later epochs than the resumed one \(epoch 1\): "
                                         r"checkpoint-0002\.pth, checkpoint-0003\.pth"):
        fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16),
            _cfg(tmp_path, epochs=3, warmup_steps=0, resume=str(first)))
    again = tmp_path / "again"
    again.mkdir()
    (again / "checkpoint-0001.pth").write_bytes(first.read_bytes())
    r = fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16),
            _cfg(again, epochs=3, warmup_steps=0, resume=str(again / "checkpoint-0001.pth")))
    assert r.steps == 6


def test_resume_with_another_architecture_is_a_clear_error(tmp_path):
    from tec_fast import TECConfig, TECModel
    from train_helpers import tiny_vit
    fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), _cfg(tmp_path, epochs=1, warmup_steps=0))
    other = TECModel(TECConfig(encoder=tiny_vit(), decoder_dim=16, decoder_depth=1, decoder_heads=2, tau=1.0))
    with pytest.raises(ValueError, match="holds a different model"):
        fit(other, tiny_objective(), AugmentedImages(n=16), _cfg(tmp_path, epochs=2, resume="auto", warmup_steps=0))
    # another command's run (a probe resuming a TEC folder): said so, not as a list of keys
    with pytest.raises(ValueError, match=r"the checkpoint is a 'tec' run's, this is a 'linprobe' run: resume it "
                                         r"with the command that wrote it"):
        fit(other, tiny_objective(), AugmentedImages(n=16),
            _cfg(tmp_path, name="linprobe", epochs=2, resume="auto", warmup_steps=0))


def test_resume_refuses_nonfinite_weights(tmp_path):
    fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), _cfg(tmp_path, epochs=1, warmup_steps=0))
    path = tmp_path / "checkpoint-last.pth"
    ck = torch.load(path, weights_only=True)
    next(iter(ck["model"].values())).view(-1)[0] = float("nan")
    torch.save(ck, path)
    with pytest.raises(ValueError, match="non-finite weights"):
        fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), _cfg(tmp_path, epochs=2, resume="auto", warmup_steps=0))


def _finished_run(out, **kw):
    """A one-epoch run (16 images / batch 4 / accum 2: 2 steps) with its checkpoint-last."""
    fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), _cfg(out, epochs=1, warmup_steps=0), **kw)
    return out / "checkpoint-last.pth"


@pytest.mark.parametrize("key, value, needle", [
    ("step", "2", "its step must be an int >= 0, got '2'"),
    ("step", -5, "its step must be an int >= 0, got -5"),
    ("epoch", -3, "its epoch must be an int >= 0, got -3"),
    ("step_in_epoch", 10 ** 6, "its step_in_epoch 1000000 is not below this run's 2 steps per epoch"),
    ("step_in_epoch", 2, "its step_in_epoch 2 is not below this run's 2 steps per epoch"),
])
def test_resume_refuses_damaged_position_fields(tmp_path, key, value, needle):
    path = _finished_run(tmp_path / "a")
    ck = torch.load(path, weights_only=True)
    ck[key] = value
    torch.save(ck, path)
    with pytest.raises(ValueError, match=f"--resume {path}: {needle}"):
        fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16),
            _cfg(tmp_path / "b", epochs=2, resume=str(path), warmup_steps=0))
    assert not (tmp_path / "b" / "checkpoint-last.pth").exists()


def test_resume_refuses_non_floating_weights(tmp_path):
    """load_state_dict would cast a complex tensor to float (dropping its imaginary part)."""
    path = _finished_run(tmp_path / "a")
    ck = torch.load(path, weights_only=True)
    key = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][key] = ck["model"][key].to(torch.complex64)
    torch.save(ck, path)
    with pytest.raises(ValueError, match=f"--resume {path}: key '{key}' holds torch.complex64"):
        fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16),
            _cfg(tmp_path / "b", epochs=2, resume=str(path), warmup_steps=0))


def test_resume_of_a_completed_schedule_says_so_and_trains_nothing(tmp_path, capsys):
    path = _finished_run(tmp_path / "a")
    r = fit(tiny_tec(seed=5), tiny_objective(), AugmentedImages(n=16),
            _cfg(tmp_path / "b", epochs=1, max_steps=1, resume=str(path), warmup_steps=0))
    err = capsys.readouterr().err
    assert f"--resume {path}: the checkpoint has already completed the schedule (step 2 of 1)" in err
    assert r.steps == 2 and r.losses == []
    _assert_same_state(r.model.state_dict(), torch.load(path, weights_only=True)["model"], "model")


def _base_extra(**kw):
    base = {"kind": "mae_vit_base", "path": "base.pth", "vit": dict(TINY_BASE_VIT), "last_layers": 2,
            "topk": 3, "tau": 1.8, "load_report": "loaded"}
    base.update(kw)
    return {"kind": "tec", "base": base}


TINY_BASE_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)


def _resume(path, folder, extra: dict):
    """A two-epoch run resuming ``path`` into ``folder`` with this run's ``checkpoint_extra``."""
    return fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16),
               _cfg(folder, epochs=2, resume=str(path), warmup_steps=0), checkpoint_extra=extra)


def test_resume_with_another_base_or_target_recipe_warns_naming_both(tmp_path):
    path = _finished_run(tmp_path / "a", checkpoint_extra=_base_extra())
    with pytest.warns(RuntimeWarning, match=r"different base or target recipe: path 'base.pth' -> "
                                            r"'other.pth'; tau 1.8 -> 1.0 \(checkpoint -> now\)"):
        _resume(path, tmp_path / "b", _base_extra(path="other.pth", tau=1.0))


def test_resume_with_a_base_of_another_architecture_is_refused(tmp_path):
    path = _finished_run(tmp_path / "a", checkpoint_extra=_base_extra())
    with pytest.raises(ValueError, match=r"base of another architecture \(depth 3 -> 4; checkpoint -> now\): "
                                         r"resume with the base it records, --base mae_vit_base:base.pth"):
        _resume(path, tmp_path / "b", _base_extra(vit={**TINY_BASE_VIT, "depth": 4}))


def test_resume_of_a_protocol_run_with_another_encoder(tmp_path):
    """eval --protocol finetune --resume: the checkpoint records the encoder it fine-tunes."""
    def extra(**kw):
        return {"protocol": "finetune", "encoder_config": {**TINY_BASE_VIT, **kw}}
    path = _finished_run(tmp_path / "a", checkpoint_extra={**extra(), "encoder_source": "/enc/a.pth"})
    with pytest.raises(ValueError, match=r"fine-tunes an encoder of another architecture \(num_heads 2 -> 4"):
        _resume(path, tmp_path / "b", extra(num_heads=4))
    # the resume would go on with a.pth's weights while the result names b.pth: refused
    with pytest.raises(ValueError, match=r"evaluates the encoder /enc/a.pth, this run was given /enc/b.pth .*"
                                         r"resume with /enc/a.pth, or evaluate /enc/b.pth in another --output"):
        _resume(path, tmp_path / "c", {**extra(), "encoder_source": "/enc/b.pth"})
    assert not (tmp_path / "c" / "checkpoint-last.pth").exists()
    enc, link = tmp_path / "enc.pth", tmp_path / "link.pth"  # two names of one file: the same encoder
    enc.write_bytes(b"weights")
    link.symlink_to(enc)
    path = _finished_run(tmp_path / "d", checkpoint_extra={**extra(), "encoder_source": str(enc)})
    _resume(path, tmp_path / "e", {**extra(), "encoder_source": str(link)})
    # with digests the weights decide: another path with the same weights goes on, the same path
    # with other weights (the file overwritten) is refused
    path = _finished_run(tmp_path / "f", checkpoint_extra={**extra(), "encoder_source": "/enc/a.pth",
                                                           "encoder_digest": "d1"})
    _resume(path, tmp_path / "g", {**extra(), "encoder_source": "/moved/a.pth", "encoder_digest": "d1"})
    with pytest.raises(ValueError, match=r"evaluates the encoder /enc/a.pth, this run was given /enc/a.pth, which "
                                         r"holds other weights \(digest d1 -> d2;"):
        _resume(path, tmp_path / "h", {**extra(), "encoder_source": "/enc/a.pth", "encoder_digest": "d2"})


def test_weights_digest_follows_the_values_not_the_object():
    from tec_fast.training.saving import weights_digest
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2).to(torch.bfloat16)
    b = torch.nn.Linear(3, 2).to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.bias[1] = b.bias[1].item() + 2 ** -6  # one value changed
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) != weights_digest(a.float())  # the dtype is part of it
