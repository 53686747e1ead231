"""Faults: a NaN/inf loss stops the run with its step number and leaves only good checkpoints;
SIGTERM to the command line (or its process group) saves, exits 143, and --resume finishes the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tec_fast.training import FitConfig, NonFiniteLoss, NonFiniteWeights, fit
from train_helpers import AugmentedImages, tiny_objective, tiny_tec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PoisonAt:
    """The tiny TEC objective, but the loss becomes ``value`` from optimizer step ``step``."""

    def __init__(self, step: int, value: float):
        self.inner, self.step, self.value, self.calls = tiny_objective(), step, value, 0
        self.noise_columns = self.inner.noise_columns

    def __call__(self, model, batch, noise):
        self.calls += 1
        out = self.inner(model, batch, noise)
        if self.calls >= self.step:  # accum = 1: call n is step n
            out["loss"] = out["loss"] * self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_with_step_and_no_bad_checkpoint(tmp_path, value):
    cfg = FitConfig(epochs=5, batch_size=4, lr=1e-3, warmup_steps=1, save_every_steps=2, progress=False,
                    output_dir=str(tmp_path), log_every=1)
    model = tiny_tec()
    with pytest.raises(NonFiniteLoss, match="step 5") as info:
        fit(model, PoisonAt(5, value), AugmentedImages(n=32), cfg)
    assert info.value.step == 5 and info.value.checkpoint == (str(tmp_path / "checkpoint-last.pth"), 4)
    ck = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ck["step"] == 4  # the save at step 4; nothing after the bad step
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())  # no step was taken on it
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "nonfinite_loss" and events[-1]["step"] == 5


def _cli(folder, out, *extra):
    return [sys.executable, "-m", "tec_fast.train", "--data", str(folder), "--objective", "mae",
            "--model", "vit_demo_patch4", "--img-size", "32", "--decoder-dim", "32", "--decoder-depth", "1",
            "--decoder-heads", "2", "--batch-size", "2", "--num-workers", "0", "--epochs", "40",
            "--warmup-epochs", "1", "--log-every", "1", "--output", str(out), *extra]


@pytest.mark.parametrize("group", [False, True], ids=["to the process", "to its group, with a loader worker"])
def test_sigterm_saves_then_exits_and_resume_finishes(tmp_path, group):
    """SIGTERM to the command, or to its whole process group (Slurm's scancel, ``kill -- -PGID``),
    where a loader worker gets it too: the worker ignores it, the main process saves and exits
    143 (a worker dying of it made the main process fail with torch's "DataLoader worker is
    killed by signal" before saving)."""
    from test_train import _image_folder
    folder = _image_folder(tmp_path / "images", n_per_class=4, corrupt=False)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    workers = ("--num-workers", "1") if group else ()
    proc = subprocess.Popen(_cli(folder, out, *workers), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=group)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few steps are logged, then stop it
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM received" in stdout and "--resume" in stdout
    ck = torch.load(out / "checkpoint-last.pth", weights_only=True)
    stopped_at = ck["step"]
    assert 3 <= stopped_at < 160
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert any(e.get("event") == "interrupted" and e["step"] == stopped_at for e in events)

    (out / ".tmp-killed01.pth").write_bytes(b"half a checkpoint")  # as a save killed mid-write leaves
    (out / ".link-99999.pth").write_bytes(b"")
    done = subprocess.run(_cli(folder, out, "--resume", "--max-steps", str(stopped_at + 3), "--no-progress"),
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed 2 temporary file(s) left by an interrupted save" in done.stdout + done.stderr
    assert not (out / ".tmp-killed01.pth").exists() and not (out / ".link-99999.pth").exists()
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["step"] == stopped_at + 3


def test_nonfinite_weights_are_never_saved_and_the_message_is_true(tmp_path):
    """A parameter that turns NaN with a finite loss (as a huge learning rate can make it) is
    caught before the save: the newest checkpoint on disk is the one the message names."""
    def poison(step, metrics):
        if step == 3:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")

    cfg = FitConfig(epochs=5, batch_size=4, lr=1e-3, warmup_steps=1, save_every_steps=1, progress=False,
                    output_dir=str(tmp_path), log_every=1)
    model = tiny_tec()
    with pytest.raises(NonFiniteWeights) as info:
        fit(model, tiny_objective(), AugmentedImages(n=32), cfg, on_step=poison)
    last = str(tmp_path / "checkpoint-last.pth")
    assert info.value.step == 3 and info.value.checkpoint == (last, 2)
    assert f"{last} (step 2)" in str(info.value) and "finite" in str(info.value)
    ck = torch.load(last, weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "nonfinite_weights" and events[-1]["step"] == 3


def test_nonfinite_loss_without_a_checkpoint_says_so(tmp_path):
    cfg = FitConfig(epochs=5, batch_size=4, lr=1e-3, warmup_steps=1, progress=False, output_dir=str(tmp_path))
    with pytest.raises(NonFiniteLoss, match="no checkpoint has been written by this run"):
        fit(tiny_tec(), PoisonAt(2, float("nan")), AugmentedImages(n=32), cfg)
    assert not (tmp_path / "checkpoint-last.pth").exists()


def test_weights_are_checked_even_without_an_output_folder():
    def poison(step, metrics):
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("inf")

    model = tiny_tec()
    cfg = FitConfig(max_steps=1, batch_size=4, lr=1e-3, warmup_steps=0, progress=False)
    with pytest.raises(NonFiniteWeights, match="no checkpoint"):
        fit(model, tiny_objective(), AugmentedImages(n=8), cfg, on_step=poison)


def test_fit_gives_the_signal_handlers_back(tmp_path):
    """fit handles SIGTERM / SIGINT while it runs (save, then stop) and puts the caller's handlers
    back when it returns or raises: a notebook's Ctrl-C must interrupt again afterwards."""
    def mine(signum, frame):
        pass

    before = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        cfg = FitConfig(max_steps=2, batch_size=4, lr=1e-3, warmup_steps=1, progress=False, num_workers=0)
        fit(tiny_tec(), tiny_objective(), AugmentedImages(n=16), cfg)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
        with pytest.raises(NonFiniteLoss):
            fit(tiny_tec(), PoisonAt(1, float("nan")), AugmentedImages(n=16), cfg)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_second_ctrl_c_interrupts_at_once():
    """The first SIGINT asks the loop to save and stop after its step; a second one raises
    KeyboardInterrupt at once (a user who does not want to wait for the save)."""
    from tec_fast.training.faults import _SignalFlag
    with _SignalFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
