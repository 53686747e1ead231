"""The training loop every objective shares (TEC, MAE base pretraining): ``fit(model, objective,
dataset, FitConfig)``.

It owns no math: the objective computes the loss. Around it: data order and per-sample seeds,
masking noise, mixed precision, gradient accumulation, AdamW with the per-step schedule, DDP or
FSDP2 under torchrun, checkpoints that resume exactly, the NaN guard, SIGTERM/SIGINT handling,
progress, metrics.

Reproducibility, by construction rather than by restoring worker state:
- data order is a permutation drawn from (seed, epoch) (``DistributedSampler``), so a resumed
  run skips exactly the consumed batches;
- every sample's augmentation runs under an RNG seeded from (seed, epoch, index), so it does not
  depend on worker count, world size or where a run was resumed;
- the masking noise of micro-step (step, micro) is drawn for the whole *global* batch from
  (seed, step, micro) and each rank takes its own rows, so N processes see exactly the images
  and masks one process sees with the same global batch.

Variable-size batches (native resolution): ``fit(..., batch_sampler=plan, collate_fn=...)`` takes a
*global* plan of batches (lists of dataset indices, re-planned per epoch through ``set_epoch``);
``ResumableBatchSampler`` deals it out to the ranks (bins[rank::world]) and resumes it at any
optimizer step. Images per step are counted from the batches themselves (``len(batch[0])``).
"""

import os
import signal
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from tec_fast.checkpoint import read_checkpoint
from tec_fast.training.checkpoints import CHECKPOINT_FORMAT, CheckpointManager
from tec_fast.training.config import FitConfig, FitResult
from tec_fast.training.distributed import (
    DistInfo,
    _load_optimizer_state,
    _model_state,
    _no_sync,
    _wrap_model,
    setup_distributed,
)
from tec_fast.training.faults import NonFiniteLoss, TrainingInterrupted, _SignalFlag
from tec_fast.training.monitor import MetricsLog, Progress
from tec_fast.training.optim import build_optimizer, lr_at, set_lr
from tec_fast.training.sampling import (
    ResumableBatchSampler,
    ResumableSampler,
    SeededSamples,
    masking_noise,
)
from tec_fast.training.state import (
    resolve_resume,
    rng_state,
    seed_everything,
    set_rng_state,
)


# ------------------------------------------------------------------------------------ helpers
def build_loader(dataset: Dataset, cfg: FitConfig, dist_info: DistInfo, shuffle: bool = True,
                 batch_sampler=None, collate_fn: Optional[Callable] = None):
    """(loader, sampler, steps_per_epoch) with the reproducibility properties of this module.
    ``batch_sampler``: a global plan of variable-size batches (see ``ResumableBatchSampler``)
    instead of fixed batches of ``cfg.batch_size``; ``collate_fn``: the DataLoader's."""
    workers = cfg.num_workers
    common = dict(num_workers=workers, collate_fn=collate_fn,
                  pin_memory=cfg.pin_memory and dist_info.device.type == "cuda",
                  persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    if batch_sampler is not None:
        sampler = ResumableBatchSampler(batch_sampler, dist_info.world, dist_info.rank, cfg.seed)
        steps_per_epoch = sampler.num_batches // cfg.accum
        if steps_per_epoch < 1:
            raise ValueError(f"the batch plan ({sampler.num_batches} batches per process) is smaller "
                             f"than one optimizer step: accum {cfg.accum} x {dist_info.world} processes")
        sampler.limit = steps_per_epoch * cfg.accum
        return DataLoader(SeededSamples(dataset), batch_sampler=sampler, **common), sampler, steps_per_epoch
    sampler = ResumableSampler(dataset, dist_info.world, dist_info.rank, shuffle, cfg.seed)
    micro_per_epoch = sampler.num_samples // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.accum
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset ({len(dataset)} images, {sampler.num_samples} per process) "
                         f"is smaller than one optimizer step: batch_size {cfg.batch_size} x accum "
                         f"{cfg.accum} x {dist_info.world} processes")
    sampler.limit = steps_per_epoch * cfg.accum * cfg.batch_size
    loader = DataLoader(SeededSamples(dataset), batch_size=cfg.batch_size, sampler=sampler,
                        drop_last=True, **common)
    return loader, sampler, steps_per_epoch


def batch_images(batch) -> int:
    """Images in a batch: ``len`` of its first item (a tensor's rows, a ``NativeBatch``'s images)."""
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return len(first)


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if callable(getattr(batch, "to", None)):  # e.g. a NativeBatch
        return batch.to(device, non_blocking=True)
    return batch



def _forward_backward(wrapped, sync, objective, batches, scaler, cfg: FitConfig, d: DistInfo, step: int,
                      num_patches: Optional[int], amp_dtype) -> Tuple[List[str], torch.Tensor, int]:
    """The ``accum`` micro-steps of one optimizer step: (metric names, their means on device,
    images this process saw)."""
    names, sums, images = None, None, 0
    for micro in range(cfg.accum):
        batch = _to_device(next(batches), d.device)
        images += batch_images(batch)
        noise = None
        if num_patches is not None:
            noise = masking_noise(cfg.seed, step, micro, cfg.batch_size * d.world, num_patches,
                                  d.rank, d.world).to(d.device, non_blocking=True)
        with _no_sync(sync, cfg, micro == cfg.accum - 1), \
                torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = objective(wrapped, batch, noise)
            loss = out["loss"] / cfg.accum
        scaler.scale(loss).backward()
        names = list(out)
        vals = torch.stack([out[k].detach().float() for k in names]) / cfg.accum
        sums = vals if sums is None else sums + vals
    return names, sums, images


def _agree(names: List[str], sums: torch.Tensor, signalled: bool, over_time: bool, d: DistInfo,
           images: int = 0):
    """One host sync per step, shared by all ranks: the global mean metrics, whether any rank
    saw a non-finite value, got a signal, or ran out of time, and the images of all ranks.
    -> (metrics, nonfinite, signal, time, images)"""
    flags = torch.tensor([float(signalled), float(over_time), float(images)], device=sums.device)
    packed = torch.cat([sums, (~torch.isfinite(sums)).any().float().view(1), flags])
    if d.enabled:
        dist.all_reduce(packed)
        packed[:len(names)] /= d.world
    values = packed.tolist()
    nonfinite, stop_signal, stop_time = (bool(v) for v in values[len(names):len(names) + 3])
    return dict(zip(names, values[:len(names)])), nonfinite, stop_signal, stop_time, int(round(values[-1]))


# ------------------------------------------------------------------------------------- fit
def fit(model: nn.Module, objective: Callable, dataset: Dataset, cfg: FitConfig,
        checkpoint_extra: Optional[dict] = None,
        on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
        batch_sampler=None, collate_fn: Optional[Callable] = None) -> FitResult:
    """Train ``model`` on ``dataset`` with ``objective(model, batch, noise) -> {'loss': ...,
    other 0-dim tensors}``. ``objective.num_patches`` (if present) sizes the masking noise
    handed to it; ``noise`` is None otherwise. ``checkpoint_extra`` (plain data: configs, what
    the model is) goes into every checkpoint; ``on_step(step, metrics)`` runs after each
    optimizer step (tests use it). ``batch_sampler`` / ``collate_fn``: variable-size batches
    from a global per-epoch plan (``ResumableBatchSampler``; ``cfg.batch_size`` is then unused,
    the lr rule takes the plan's mean images per batch). Raises ``NonFiniteLoss`` and
    ``TrainingInterrupted``."""
    d = setup_distributed()
    t_start = time.perf_counter()
    out_dir = cfg.output_dir
    ckpts = CheckpointManager(out_dir, cfg.keep_last, cfg.keep_every) if out_dir else None
    resume_path = resolve_resume(cfg.resume, out_dir)
    resumed = read_checkpoint(resume_path) if resume_path else None

    seed_everything(cfg.seed)
    model.to(d.device)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    wrapped, sync = _wrap_model(model, cfg, d)

    loader, sampler, steps_per_epoch = build_loader(dataset, cfg, d, batch_sampler=batch_sampler,
                                                    collate_fn=collate_fn)
    per_micro = sampler.mean_batch_size if batch_sampler is not None else cfg.batch_size
    global_batch = max(1, int(round(per_micro * cfg.accum * d.world)))
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup >= total_steps:
        warnings.warn(f"warmup ({warmup} steps) is not shorter than the schedule ({total_steps} steps); "
                      f"warming up over the first 10% instead", RuntimeWarning)
        warmup = total_steps // 10
    peak_lr = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256

    optimizer, opt_name = build_optimizer(model, peak_lr, cfg.weight_decay, cfg.betas, cfg.optimizer)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    num_patches = getattr(objective, "num_patches", None)

    step, epoch, step_in_epoch = 0, 0, 0
    if resumed is not None:
        _load_optimizer_state(model, optimizer, resumed["optimizer"], cfg, d)
        if resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        step, epoch, step_in_epoch = resumed["step"], resumed["epoch"], resumed["step_in_epoch"]
        set_rng_state(resumed["rng"])
        old = resumed.get("schedule", {})
        if old and (old.get("total_steps"), old.get("global_batch")) != (total_steps, global_batch):
            warnings.warn(f"resuming with a different schedule: checkpoint had {old}, now total_steps="
                          f"{total_steps}, global_batch={global_batch}", RuntimeWarning)

    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl") if out_dir and d.is_main else None,
                     os.path.join(out_dir, "tensorboard") if out_dir and cfg.tensorboard and d.is_main else None)
    log.write({"event": "start", "stage": cfg.name, "step": step, "world": d.world, "device": str(d.device),
               "optimizer": opt_name, "lr": peak_lr, "global_batch": global_batch, "total_steps": total_steps,
               "steps_per_epoch": steps_per_epoch, "resumed_from": resume_path, "config": cfg.to_dict()})
    progress = Progress(cfg.name, total_steps, step, cfg.log_every, enabled=cfg.progress and d.is_main)
    last_saved: Optional[str] = None
    saved_at = -1

    def save(epoch_done: Optional[int] = None) -> Optional[str]:
        nonlocal last_saved, saved_at
        if ckpts is None:
            return None
        model_sd, optim_sd = _model_state(model, optimizer, cfg, d)
        if d.is_main:
            state = {"format": CHECKPOINT_FORMAT, "stage": cfg.name, "model": model_sd, "optimizer": optim_sd,
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                     "schedule": {"total_steps": total_steps, "warmup_steps": warmup, "peak_lr": peak_lr,
                                  "min_lr": cfg.min_lr, "global_batch": global_batch},
                     "rng": rng_state(), "fit_config": cfg.to_dict(), "world": d.world,
                     "torch_version": str(torch.__version__), **(checkpoint_extra or {})}
            last_saved = ckpts.save(state, epoch_done)
            log.write({"event": "checkpoint", "stage": cfg.name, "step": step, "path": last_saved})
        saved_at = step
        return last_saved

    losses: List[float] = []
    metrics: Dict[str, float] = {}
    stopped = "completed"
    t_loop = time.perf_counter()
    steps_this_call, t_log, steps_since_log, window = 0, time.perf_counter(), 0, {}
    images_this_call, images_since_log = 0, 0
    lr = peak_lr
    wrapped.train()
    with _SignalFlag() as sig:
        while step < total_steps:
            sampler.set_epoch(epoch)
            sampler.resume_at(step_in_epoch * cfg.accum, cfg.batch_size)
            batches = iter(loader)
            while step < total_steps:
                lr = lr_at(step, total_steps, warmup, peak_lr, cfg.min_lr)
                set_lr(optimizer, lr)
                names, sums, images = _forward_backward(wrapped, sync, objective, batches, scaler, cfg, d, step,
                                                num_patches, amp_dtype)
                over_time = cfg.time_limit is not None and time.perf_counter() - t_start > cfg.time_limit
                metrics, nonfinite, stop_signal, stop_time, images = _agree(
                    names, sums, sig.signum is not None, over_time, d, images)
                if nonfinite:
                    log.write({"event": "nonfinite_loss", "stage": cfg.name, "step": step + 1, **metrics})
                    log.close()
                    progress.close()
                    raise NonFiniteLoss(step + 1, metrics)
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step, step_in_epoch, steps_this_call = step + 1, step_in_epoch + 1, steps_this_call + 1
                epoch_end = step_in_epoch == steps_per_epoch
                if epoch_end:
                    epoch, step_in_epoch = epoch + 1, 0
                losses.append(metrics["loss"])
                for k, v in metrics.items():
                    window[k] = window.get(k, 0.0) + v
                steps_since_log += 1
                images_since_log += images
                images_this_call += images
                now = time.perf_counter()
                img_s = images_since_log / max(now - t_log, 1e-9)
                progress.update(step, epoch, img_s, {k: v for k, v in metrics.items() if k != "grad_norm"}, lr)
                if step % cfg.log_every == 0 or step == total_steps:
                    log.write({"stage": cfg.name, "step": step, "epoch": epoch, "lr": lr,
                               **{k: v / steps_since_log for k, v in window.items()},
                               "img_per_s": img_s, "elapsed_s": now - t_start})
                    t_log, steps_since_log, images_since_log, window = now, 0, 0, {}
                if on_step is not None:
                    on_step(step, metrics)
                if epoch_end and (epoch % cfg.save_every_epochs == 0 or step == total_steps):
                    save(epoch_done=epoch)
                elif cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    save()
                if stop_signal:
                    signum = sig.signum if sig.signum is not None else signal.SIGTERM
                    path = last_saved if saved_at == step else save()
                    log.write({"event": "interrupted", "stage": cfg.name, "step": step,
                               "signal": signal.Signals(signum).name, "checkpoint": path})
                    log.close()
                    progress.close()
                    raise TrainingInterrupted(signum, step, path)
                if stop_time:
                    stopped = "time_limit"
                if stop_time or epoch_end:
                    break
            if stopped != "completed":
                break
    if saved_at != step:
        save()
    progress.close()
    if stopped == "time_limit" and d.is_main:
        print(f"[{cfg.name}] time limit ({cfg.time_limit:.0f} s) reached: stopped after step {step} of "
              f"{total_steps}", file=sys.stderr)
    seconds = time.perf_counter() - t_start
    img_per_s = images_this_call / max(time.perf_counter() - t_loop, 1e-9)
    log.write({"event": "end", "stage": cfg.name, "step": step, "stopped": stopped, "seconds": seconds,
               "img_per_s": img_per_s, "checkpoint": last_saved, **metrics})
    log.close()
    return FitResult(model=model, steps=step, total_steps=total_steps, epoch=epoch, seconds=seconds,
                     img_per_s=img_per_s, losses=losses, metrics=metrics, stopped=stopped,
                     checkpoint=last_saved, optimizer=opt_name, lr=peak_lr, global_batch=global_batch)
