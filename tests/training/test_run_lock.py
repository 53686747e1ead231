"""One run per output folder (a second run is refused with the holder's pid; a killed holder
frees the folder; torchrun's restarted worker resumes through it), and files a run writes get
the mode the user's umask gives ordinary files."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from tec_fast.checkpoint import save_atomic
from tec_fast.training.run_lock import LOCK_FILE, OutputFolderInUse, hold_output_lock

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([HERE, ROOT])}

HOLDER = ("import sys, time\n"
          "from tec_fast.training.run_lock import hold_output_lock\n"
          "with hold_output_lock(sys.argv[1]):\n"
          "    print('locked', flush=True)\n"
          "    time.sleep(600)\n")


def _hold_in_child(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _mae_cli(folder, out, *extra):
    return ["--data", str(folder), "--objective", "mae", "--model", "vit_demo_patch4", "--img-size", "32",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "2",
            "--num-workers", "0", "--warmup-epochs", "1", "--log-every", "1", "--no-progress",
            "--output", str(out), *extra]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from test_train import _image_folder
    return _image_folder(tmp_path_factory.mktemp("images"), n_per_class=4, corrupt=False)


def test_a_second_lock_in_the_same_process_is_refused_then_free_again(tmp_path):
    with hold_output_lock(tmp_path / "run"):
        with pytest.raises(OutputFolderInUse, match=rf"{tmp_path / 'run'} is in use by another run \(pid {os.getpid()}"):
            with hold_output_lock(tmp_path / "run"):
                pass
    with hold_output_lock(tmp_path / "run"):  # released at the end of the block
        pass


def test_a_second_training_run_is_refused_with_the_holders_pid(images, tmp_path, capsys):
    from tec_fast.cli.train import main
    out = tmp_path / "run"
    holder = _hold_in_child(out)
    try:
        assert main(_mae_cli(images, out, "--max-steps", "2")) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --output ")
    assert str(out) in err[0] and f"pid {holder.pid}" in err[0]
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # the refused run wrote nothing


def test_the_demo_takes_the_lock_too(tmp_path, capsys):
    from tec_fast.cli.train import main
    holder = _hold_in_child(tmp_path / "demo")
    try:
        assert main(["--demo-tiny", "--output", str(tmp_path / "demo")]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in capsys.readouterr().err


FORKING_HOLDER = ("import os, sys, time\n"
                  "from tec_fast.training.run_lock import hold_output_lock\n"
                  "with hold_output_lock(sys.argv[1]):\n"
                  "    child = os.fork()\n"
                  "    if child == 0:\n"
                  "        time.sleep(600)\n"
                  "        os._exit(0)\n"
                  "    print(child, flush=True)\n"
                  "    time.sleep(600)\n")


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs os.register_at_fork")
def test_a_forked_child_does_not_keep_the_lock_of_a_killed_run(tmp_path):
    """A loader worker is a forked child of the run: after the run is SIGKILLed it lives on for
    seconds (until torch's watchdog sees its parent gone); it must not hold the folder's lock
    (a flock lasts while any copy of its descriptor is open)."""
    proc = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(tmp_path)], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        os.kill(child, 0)  # the orphan still runs
        with hold_output_lock(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_sigkilled_holder_leaves_a_folder_the_next_run_uses(images, tmp_path):
    """A training run killed with SIGKILL (no handler runs) does not leave its folder locked:
    the next run resumes from its checkpoint; what both runs wrote is readable by others
    (umask 022 gives 0644)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tec_fast.train", *_mae_cli(images, out, "--epochs", "40", "--save-every-steps", "1")]
    old = os.umask(0o022)
    try:
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "checkpoint-last.pth").exists():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        step = torch.load(out / "checkpoint-last.pth", weights_only=True)["step"]
        done = subprocess.run(cmd + ["--resume", "--max-steps", str(step + 2)], env=ENV, capture_output=True,
                              text=True, timeout=180)
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["step"] == step + 2
    for name in ("checkpoint-last.pth", "metrics.jsonl", "encoder_mae.pth"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name


def test_torchrun_restart_resumes_through_the_lock(images, tmp_path):
    """Under ``torchrun --max-restarts 1``, the worker SIGKILLed mid-run is restarted with the same
    ``--resume`` command line: it takes the lock its dead predecessor held and finishes the run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "--max-restarts", "1", "-m", "tec_fast.train",
           *_mae_cli(images, out, "--max-steps", "12", "--save-every-steps", "1", "--resume")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = out / LOCK_FILE
    deadline = time.time() + 180
    pid = None
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint-last.pth").exists() and lock.exists() and lock.read_text().startswith("pid="):
            pid = int(lock.read_text().split()[0].split("=")[1])
            break
        time.sleep(0.1)
    assert pid is not None, "the worker never saved a checkpoint"
    os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "resum" in output.lower()
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["step"] == 12


def test_a_restarted_torchrun_worker_waits_for_its_predecessor(tmp_path, monkeypatch):
    holder = _hold_in_child(tmp_path)
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1.0); os.kill({holder.pid}, 9)"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    t0 = time.monotonic()
    try:
        with hold_output_lock(tmp_path):
            assert time.monotonic() - t0 >= 0.5
    finally:
        killer.wait()
        holder.wait()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_the_umask_mode(tmp_path, umask, mode):
    """Checkpoints and config.yaml get the mode open() would give (mkstemp's 0600 replaced)."""
    from tec_fast.cli.config import write_text_atomic
    old = os.umask(umask)
    try:
        save_atomic({"x": torch.zeros(2)}, tmp_path / "ck.pth")
        write_text_atomic(str(tmp_path / "config.yaml"), "a: 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "ck.pth").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "config.yaml").st_mode) == mode
