"""What a run writes and when: the checkpoint state, written by rank 0 after every process has
checked that its parameters are finite (so no NaN or inf ever reaches disk), and the resume
from such a checkpoint."""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from tec_fast.checkpoint import read_checkpoint
from tec_fast.training.checkpoints import CHECKPOINT_FORMAT, CheckpointManager
from tec_fast.training.config import FitConfig
from tec_fast.training.distributed import DistInfo, _load_optimizer_state, _model_state
from tec_fast.training.faults import NonFiniteWeights, TrainingInterrupted, nonfinite_parameters
from tec_fast.training.monitor import MetricsLog
from tec_fast.training.optim import Schedule
from tec_fast.training.state import (Position, nothing_to_resume, resolve_resume, rng_state,
                                     set_rng_state)


# what a checkpoint written by RunSaver holds and a resume reads
RESUME_KEYS = ("model", "optimizer", "step", "epoch", "step_in_epoch", "rng")


def load_for_resume(model: nn.Module, cfg: FitConfig, d: DistInfo,
                    extra: Optional[dict] = None) -> Tuple[Optional[str], Optional[dict]]:
    """(path, checkpoint) of the run to continue, its weights already in ``model``; (None, None)
    when there is nothing to resume (said once, on rank 0, when ``--resume`` asked for it).
    A checkpoint of another architecture (``check_same_setup`` against ``extra``, this run's
    ``checkpoint_extra``), with a position that is no count of steps, or with weights that are not
    finite or not floating-point is refused (ValueError naming the file)."""
    path = resolve_resume(cfg.resume, cfg.output_dir)
    if path is None:
        if cfg.resume is not None and d.is_main:
            print(f"[{cfg.name}] {nothing_to_resume(cfg.output_dir)}", file=sys.stderr)
        return None, None
    ck = read_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in ck]
    if missing:
        raise ValueError(f"--resume {path}: not a training checkpoint of this engine (no "
                         f"{', '.join(missing)}; it has {', '.join(sorted(ck)[:8])})")
    for key in ("step", "epoch", "step_in_epoch"):  # hand-edited values would fail far from here
        value = ck[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"--resume {path}: its {key} must be an int >= 0, got {value!r} "
                             f"({type(value).__name__}; damaged checkpoint?)")
    check_same_setup(ck, extra or {}, path)
    later = CheckpointManager(cfg.output_dir).later_epochs(ck["epoch"]) if cfg.output_dir else []
    if later:  # this run's epoch files would be pruned against them, and resumed from later
        shown = ", ".join(later[:3]) + (", ..." if len(later) > 3 else "")
        raise ValueError(f"--resume {path}: {cfg.output_dir} holds checkpoints of later epochs than the resumed "
                         f"one (epoch {ck['epoch']}): {shown}; this run would write its own epochs beside them "
                         f"and keep the highest numbers, mixing two runs. Resume into another --output (copy "
                         f"the checkpoint there), or delete those files")
    if not isinstance(ck["model"], dict):
        raise ValueError(f"--resume {path}: its model entry is a {type(ck['model']).__name__}, not a state dict")
    own = model.state_dict()
    for key, value in ck["model"].items():  # load_state_dict would cast them silently
        if key in own and isinstance(value, torch.Tensor) and own[key].is_floating_point() \
                and not value.is_floating_point():
            raise ValueError(f"--resume {path}: key {key!r} holds {value.dtype} values where the model has "
                             f"a floating-point {own[key].dtype} tensor")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
        stage = ck.get("stage")
        if isinstance(stage, str) and stage != cfg.name:  # another command's run: say that, not the keys
            raise ValueError(f"--resume {path}: the checkpoint is a {stage!r} run's, this is a {cfg.name!r} run: "
                             f"resume it with the command that wrote it, or give this run another --output") \
                from None
        first = str(exc).strip().splitlines()
        raise ValueError(f"--resume {path}: the checkpoint holds a different model than the one "
                         f"being trained ({' '.join(ln.strip() for ln in first[:3])[:400]})") from None
    bad = nonfinite_parameters(model)
    if bad:
        raise ValueError(f"--resume {path}: the checkpoint holds non-finite weights ({', '.join(bad[:5])})")
    return path, ck


def check_same_setup(ck: dict, extra: dict, path: str) -> None:
    """What a checkpoint records about the models around the trained one, against this run's
    ``checkpoint_extra``: TEC's ``base`` (kind, path, architecture, target recipe) and a protocol's
    ``encoder_config`` / ``encoder_source`` / ``encoder_digest`` (the encoder it trains on). Another
    architecture is refused (ValueError naming both); so is a protocol's other encoder (other
    weights by their digest, or another file where a checkpoint records no digest), since the
    resume loads the checkpoint's encoder weights, not the new file's; the same weights moved or
    copied elsewhere are the same encoder. Another base file or kind, or target
    recipe, is allowed with a warning naming what differs (checkpoint -> now), as a changed schedule is."""
    def differences(old: dict, new: dict, keys) -> list:
        return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]

    old, new = ck.get("base"), extra.get("base")
    if isinstance(old, dict) and isinstance(new, dict):
        old_vit, new_vit = old.get("vit") or {}, new.get("vit") or {}
        arch = differences(old_vit, new_vit, [k for k in {**old_vit, **new_vit} if k != "img_size"])
        if arch:
            raise ValueError(f"--resume {path}: the checkpoint was trained with targets from a base of another "
                             f"architecture ({'; '.join(arch)}; checkpoint -> now): resume with the base it "
                             f"records, --base {old.get('kind')}:{old.get('path')}")
        changed = differences(old, new, ("kind", "path", "last_layers", "topk", "tau"))
        if old_vit.get("img_size") != new_vit.get("img_size"):
            changed.append(f"base img_size {old_vit.get('img_size')!r} -> {new_vit.get('img_size')!r}")
        if changed:
            warnings.warn(f"resuming with a different base or target recipe: {'; '.join(changed)} "
                          f"(checkpoint -> now)", RuntimeWarning)
    old, new = ck.get("encoder_config"), extra.get("encoder_config")
    if isinstance(old, dict) and isinstance(new, dict) and old != new:
        raise ValueError(f"--resume {path}: the checkpoint fine-tunes an encoder of another architecture "
                         f"({'; '.join(differences(old, new, {**old, **new}))}; checkpoint -> now)")
    old, new = ck.get("encoder_source"), extra.get("encoder_source")
    old_digest, new_digest = ck.get("encoder_digest"), extra.get("encoder_digest")
    if old_digest is not None and new_digest is not None:  # the weights tell, wherever the file is now
        if old_digest != new_digest:
            raise ValueError(f"--resume {path}: the checkpoint's run evaluates the encoder {old}, this run was "
                             f"given {new}, which holds other weights (digest {old_digest} -> {new_digest}; the "
                             f"resume would go on with the first one's weights and file the result under the "
                             f"second): resume with the encoder it records, or evaluate {new} in another --output")
    elif old is not None and new is not None and not _same_file(old, new):
        raise ValueError(f"--resume {path}: the checkpoint's run evaluates the encoder {old}, this run was given "
                         f"{new} (the resume would go on with the first one's weights and file the result under "
                         f"the second): resume with {old}, or evaluate {new} in another --output")


def weights_digest(module: nn.Module) -> str:
    """A digest of ``module``'s state (names, dtypes, shapes, values): the same encoder file
    loaded from anywhere gives the same digest, another file's weights another one (a ViT-B's
    86 M fp32 weights: 0.23 s on one core of the development machine)."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return h.hexdigest()


def _same_file(a: str, b: str) -> bool:
    """Whether two recorded paths name one file (the same path, or links to one file)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is gone: the paths alone tell
        return False


def restore(ck: Optional[dict], model: nn.Module, optimizer, scaler, sched: Schedule, cfg: FitConfig,
            d: DistInfo, path: Optional[str] = None) -> Position:
    """Optimizer, loss scaler, RNG state and position of a resumed checkpoint (a fresh
    ``Position`` without one). A schedule that changed since is allowed, with a warning; a state
    that does not fit this run (a step_in_epoch past this run's epoch too) is a ValueError naming
    ``path`` and the part. A checkpoint at or past the schedule's end is said to be (the loop then
    trains nothing and the run ends with it)."""
    if ck is None:
        return Position()
    for part, load in (("optimizer", lambda: _load_optimizer_state(model, optimizer, ck["optimizer"], cfg, d)),
                       ("loss scaler", lambda: ck.get("scaler") and scaler.load_state_dict(ck["scaler"])),
                       ("RNG", lambda: set_rng_state(ck["rng"]))):
        try:
            load()
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            why = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ValueError(f"--resume {path}: its {part} state does not fit this run "
                             f"({type(exc).__name__}: {why})") from None
    old = ck.get("schedule", {})
    if old and (old.get("total_steps"), old.get("global_batch")) != (sched.total_steps, sched.global_batch):
        warnings.warn(f"resuming with a different schedule: checkpoint had {old}, now total_steps="
                      f"{sched.total_steps}, global_batch={sched.global_batch}", RuntimeWarning)
    elif old.get("steps_per_epoch", sched.steps_per_epoch) != sched.steps_per_epoch:  # same length, other data
        warnings.warn(f"resuming with {sched.steps_per_epoch} steps per epoch where the checkpoint had "
                      f"{old['steps_per_epoch']} (another data set or number of processes): the run goes on "
                      f"from step {ck['step']}, but not as the uninterrupted run would have (its epochs and "
                      f"sample order differ)", RuntimeWarning)
    if ck["step_in_epoch"] >= sched.steps_per_epoch:  # the epoch's batches would run out before it
        raise ValueError(f"--resume {path}: its step_in_epoch {ck['step_in_epoch']} is not below this run's "
                         f"{sched.steps_per_epoch} steps per epoch (damaged checkpoint, or another batch size "
                         f"or data set)")
    pos = Position(ck["step"], ck["epoch"], ck["step_in_epoch"])
    if pos.step >= sched.total_steps and d.is_main:
        print(f"[{cfg.name}] --resume {path}: the checkpoint has already completed the schedule (step "
              f"{pos.step} of {sched.total_steps}); nothing left to train (raise --max-steps or --epochs to "
              f"train on)", file=sys.stderr)
    return pos


class RunSaver:
    """Checkpoints of one ``fit`` call. ``newest``: (path, step) of the newest checkpoint known
    to hold finite weights (the resumed one at first), which the non-finite errors cite."""

    def __init__(self, cfg: FitConfig, d: DistInfo, model: nn.Module, optimizer, scaler,
                 sched: Schedule, log: MetricsLog, extra: Optional[dict], newest: Optional[Tuple[str, int]]):
        self.cfg, self.d, self.model, self.optimizer, self.scaler = cfg, d, model, optimizer, scaler
        self.sched, self.log, self.extra, self.newest = sched, log, extra or {}, newest
        self.ckpts = CheckpointManager(cfg.output_dir, cfg.keep_last, cfg.keep_every) if cfg.output_dir else None
        self.saved_at = -1

    def check_finite(self, step: int) -> None:
        """Raise ``NonFiniteWeights`` (on every rank) if any rank holds a NaN or inf parameter."""
        bad = nonfinite_parameters(self.model)
        count = torch.tensor([float(len(bad))], device=self.d.device)
        if self.d.enabled:
            dist.all_reduce(count)
        if count.item() > 0:
            self.log.write({"event": "nonfinite_weights", "stage": self.cfg.name, "step": step,
                            "parameters": bad[:20]})
            raise NonFiniteWeights(step, bad or ["(on another process)"], self.newest)

    def save(self, pos: Position, epoch_done: Optional[int] = None) -> Optional[str]:
        if self.ckpts is None:
            return None
        self.check_finite(pos.step)
        model_sd, optim_sd = _model_state(self.model, self.optimizer, self.cfg, self.d)
        if self.d.is_main:
            state = {"format": CHECKPOINT_FORMAT, "stage": self.cfg.name, "model": model_sd,
                     "optimizer": optim_sd, "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                     "step": pos.step, "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
                     "schedule": self.sched.to_dict(),
                     "rng": rng_state(), "fit_config": self.cfg.to_dict(), "world": self.d.world,
                     "torch_version": str(torch.__version__), **self.extra}
            path = self.ckpts.save(state, epoch_done)
            self.log.write({"event": "checkpoint", "stage": self.cfg.name, "step": pos.step, "path": path})
            self.newest = (path, pos.step)
        self.saved_at = pos.step
        return self.newest[0] if self.newest else None

    def after_step(self, pos: Position, epoch_end: bool) -> None:
        cfg = self.cfg
        if epoch_end and (pos.epoch % cfg.save_every_epochs == 0 or pos.step == self.sched.total_steps):
            self.save(pos, epoch_done=pos.epoch)
        elif cfg.save_every_steps and pos.step % cfg.save_every_steps == 0:
            self.save(pos)

    def interrupted(self, signum: Optional[int], pos: Position) -> TrainingInterrupted:
        """Save (unless this step is saved already) and the exception that reports it."""
        signum = signum if signum is not None else signal.SIGTERM  # another rank got the signal
        path = self.save(pos) if self.saved_at != pos.step else self.newest[0] if self.newest else None
        self.log.write({"event": "interrupted", "stage": self.cfg.name, "step": pos.step,
                        "signal": signal.Signals(signum).name, "checkpoint": path})
        return TrainingInterrupted(signum, pos.step, path)

    def final(self, pos: Position) -> Optional[str]:
        """The end of the run: the weights are checked even with no output folder, since the
        caller is about to use (and usually export) them."""
        if self.ckpts is None:
            self.check_finite(pos.step)
        elif self.saved_at != pos.step:
            self.save(pos)
        return self.newest[0] if self.newest and self.ckpts is not None else None
