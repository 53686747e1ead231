"""The training loop every objective shares (TEC, MAE base pretraining): ``fit(model, objective,
dataset, FitConfig)``.

It owns no math: the objective computes the loss. Around it: data order and per-sample seeds,
masking noise, mixed precision (with bf16 / fp16: the model's Linear and conv weights cast in one
kernel per step in one process, the frozen base's once: ``precision.py``), gradient
accumulation, AdamW with the per-step schedule, DDP or FSDP2 under torchrun, checkpoints that
resume exactly, the NaN guard, SIGTERM/SIGINT handling, progress, metrics, and (``cuda_graph``) steps replayed from CUDA graphs (``graphed.py``).

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
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from tec_fast.data.transfer import to_device
from tec_fast.training.config import FitConfig, FitResult
from tec_fast.training.distributed import DistInfo, _no_sync, _wrap_model, setup_distributed
from tec_fast.training.faults import NonFiniteLoss, _SignalFlag, loader_worker_init
from tec_fast.training.graphed import GraphedStep, plan_graphs
from tec_fast.training.monitor import MetricsLog, Progress, StepMeter
from tec_fast.training.objectives import Objective
from tec_fast.training.optim import build_optimizer, plan_schedule, set_lr
from tec_fast.training.precision import CastWeightsOnce
from tec_fast.training.sampling import (
    ResumableBatchSampler,
    ResumableSampler,
    SeededSamples,
    masking_noise,
    mix_seed,
)
from tec_fast.training.saving import RunSaver, load_for_resume, restore
from tec_fast.training.state import seed_everything


# ------------------------------------------------------------------------------------ helpers
def build_loader(dataset: Dataset, cfg: FitConfig, dist_info: DistInfo, shuffle: bool = True,
                 batch_sampler=None, collate_fn: Optional[Callable] = None):
    """(loader, sampler, steps_per_epoch) with the reproducibility properties of this module.
    ``batch_sampler``: a global plan of variable-size batches (see ``ResumableBatchSampler``)
    instead of fixed batches of ``cfg.batch_size``; ``collate_fn``: the DataLoader's."""
    workers = cfg.num_workers
    # its own generator: an iterator takes its workers' base seed from it, not from torch's global
    # RNG, so a resumed run (a new iterator mid-epoch) leaves the global RNG stream where the
    # uninterrupted one has it (code drawing from it, dropout in a user's model, resumes exactly)
    common = dict(num_workers=workers, collate_fn=collate_fn,
                  pin_memory=cfg.pin_memory and dist_info.device.type == "cuda",
                  persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                  worker_init_fn=loader_worker_init if workers > 0 else None,
                  generator=torch.Generator().manual_seed(mix_seed(cfg.seed, dist_info.rank, 0x6C6F61646572)))
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
    """The batch on the device, non-blocking; uint8 images normalised there (``data.transfer``)."""
    return to_device(batch, device)


def _next_inputs(batches, objective: Objective, cfg: FitConfig, d: DistInfo, step: int, micro: int):
    """Micro-step ``micro`` of optimizer step ``step``: (batch on the device, its masking noise or None)."""
    batch = _to_device(next(batches), d.device)
    noise = None
    if objective.noise_columns is not None:
        noise = masking_noise(cfg.seed, step, micro, cfg.batch_size * d.world, objective.noise_columns,
                              d.rank, d.world)
        if not getattr(objective, "host_noise", False):
            noise = noise.to(d.device, non_blocking=True)
    return batch, noise


def _forward_backward(wrapped, sync, objective: Objective, batches, scaler, cfg: FitConfig, d: DistInfo,
                      step: int, amp_dtype,
                      graphed: Optional[GraphedStep] = None) -> Tuple[List[str], torch.Tensor, int]:
    """The ``accum`` micro-steps of one optimizer step: (metric names, their means on device,
    images this process saw). With ``graphed``, the step's first call records the graphs and
    every micro-step replays them (eager instead when the recording failed and may fall back)."""
    names, sums, images = None, None, 0
    for micro in range(cfg.accum):
        batch, noise = _next_inputs(batches, objective, cfg, d, step, micro)
        images += batch_images(batch)
        last = micro == cfg.accum - 1
        if graphed is not None and not graphed.recorded and graphed.active:
            graphed.record(batch, noise)
        if graphed is not None and graphed.active:
            names, vals = graphed.micro_step(batch, noise, last)
        else:
            with _no_sync(sync, cfg, last), \
                    torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = objective(wrapped, batch, noise)
                loss = out["loss"] / cfg.accum
            scaler.scale(loss).backward()
            names = list(out)
            vals = torch.stack([out[k].detach().float() for k in names])
        vals = vals / cfg.accum
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


def _optimizer_step(model: nn.Module, optimizer, scaler, clip_grad: Optional[float],
                    metrics: Dict[str, float]) -> None:
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), clip_grad))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _precision(cfg: FitConfig, d: DistInfo):
    """(loss scaler, autocast dtype or None): fp16 needs loss scaling, bf16 and fp32 do not."""
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
    return scaler, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)


def _epoch_batches(loader, sampler, pos, cfg: FitConfig):
    """The batches of ``pos.epoch`` from where ``pos`` is in it (a resume starts mid-epoch)."""
    sampler.set_epoch(pos.epoch)
    sampler.resume_at(pos.step_in_epoch * cfg.accum, cfg.batch_size)
    return iter(loader)


def _open_log(cfg: FitConfig, d: DistInfo, start: dict) -> MetricsLog:
    out = cfg.output_dir if d.is_main else None
    log = MetricsLog(os.path.join(out, "metrics.jsonl") if out else None,
                     os.path.join(out, "tensorboard") if out and cfg.tensorboard else None,
                     wandb_project=cfg.wandb if d.is_main else None, run_config=cfg.to_dict())
    log.write(start)
    return log


def _unreadable_images(dataset: Dataset, d: DistInfo) -> List[str]:
    """The unreadable images every process met (each was replaced by another), sorted; the
    image dataset found under the wrappers' ``.dataset`` (GPU decode, native-resolution noise)."""
    while not hasattr(dataset, "skipped_paths") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    paths = dataset.skipped_paths() if hasattr(dataset, "skipped_paths") else []
    if d.enabled:  # each process reads its own share of the images
        gathered = [None] * d.world
        torch.distributed.all_gather_object(gathered, paths)
        paths = [p for part in gathered for p in part]
    return sorted(set(paths))


def _finish(model: nn.Module, cfg: FitConfig, d: DistInfo, sched, pos, stopped: str, t_start: float,
            meter: StepMeter, checkpoint: Optional[str], opt_name: str, graph_status: str = "",
            unreadable: Sequence[str] = ()) -> FitResult:
    if stopped == "time_limit" and d.is_main:
        print(f"[{cfg.name}] time limit ({cfg.time_limit:g} s) reached: stopped after step {pos.step} "
              f"of {sched.total_steps}", file=sys.stderr)
    seconds = time.perf_counter() - t_start
    meter.log.write({"event": "end", "stage": cfg.name, "step": pos.step, "stopped": stopped,
                     "seconds": seconds, "img_per_s": meter.img_per_s, "checkpoint": checkpoint,
                     "cuda_graph": graph_status, "unreadable_images": len(unreadable),
                     "unreadable_files": list(unreadable[:10]), **meter.metrics})
    return FitResult(model=model, steps=pos.step, total_steps=sched.total_steps, epoch=pos.epoch,
                     seconds=seconds, img_per_s=meter.img_per_s, losses=meter.losses, metrics=meter.metrics,
                     stopped=stopped, checkpoint=checkpoint, optimizer=opt_name, lr=sched.peak_lr,
                     global_batch=sched.global_batch, cuda_graph=graph_status, unreadable=list(unreadable))


def _check_objective(objective) -> None:
    if not isinstance(objective, Objective):
        raise TypeError(f"{type(objective).__name__} is not an Objective: it needs a noise_columns "
                        f"attribute (int or None) and __call__(model, batch, noise)")


# ------------------------------------------------------------------------------------- fit
def fit(model: nn.Module, objective: Objective, dataset: Dataset, cfg: FitConfig,
        checkpoint_extra: Optional[dict] = None,
        on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
        batch_sampler=None, collate_fn: Optional[Callable] = None,
        make_optimizer: Optional[Callable[[nn.Module, float], Tuple[torch.optim.Optimizer, str]]] = None
        ) -> FitResult:
    """Train ``model`` on ``dataset`` with an ``Objective``. ``checkpoint_extra`` (plain data)
    goes into every checkpoint; ``on_step(step, metrics)`` runs after each optimizer step;
    ``batch_sampler`` / ``collate_fn``: variable-size batches (see the module docstring);
    ``make_optimizer(model, peak_lr) -> (optimizer, description)`` replaces AdamW (groups may carry
    an ``lr_scale``: the schedule's lr times it).
    Raises ``NonFiniteLoss`` / ``NonFiniteWeights`` (nothing non-finite is saved) and
    ``TrainingInterrupted``."""
    _check_objective(objective)
    d, t_start = setup_distributed(), time.perf_counter()
    seed_everything(cfg.seed)
    model.to(d.device)
    resume_path, resumed = load_for_resume(model, cfg, d, checkpoint_extra)
    use_graphs, graph_status = plan_graphs(cfg, d.device, d.world, None, batch_sampler is not None, objective)
    # DDP's static_graph does not combine with no_sync (a reducer assertion in torch 2.13 on the
    # first accumulated step): with accumulation, DDP records as built by default
    wrapped, sync = _wrap_model(model, cfg, d, static_graph=use_graphs and cfg.accum == 1)
    loader, sampler, steps_per_epoch = build_loader(dataset, cfg, d, batch_sampler=batch_sampler,
                                                    collate_fn=collate_fn)
    per_micro = sampler.mean_batch_size if batch_sampler is not None else cfg.batch_size
    sched = plan_schedule(cfg, per_micro * cfg.accum * d.world, steps_per_epoch)
    optimizer, opt_name = (make_optimizer(model, sched.peak_lr) if make_optimizer is not None else
                           build_optimizer(model, sched.peak_lr, cfg.weight_decay, cfg.betas, cfg.optimizer))
    scaler, amp_dtype = _precision(cfg, d)
    # What each step calls, named here; neither changes `model` or `objective`. `wrapped`: the model,
    # DDP / FSDP2 / compile's wrapper of it (_wrap_model), or with bf16 / fp16 in one eager process
    # CastWeightsOnce (its weights cast in one kernel per step). `step_objective`: the objective, or
    # with autocast its copy whose frozen base holds its weights in the autocast dtype.
    if amp_dtype is not None and not d.enabled and not cfg.compile:
        wrapped = CastWeightsOnce(model, amp_dtype)
    step_objective = objective.for_precision(amp_dtype) if hasattr(objective, "for_precision") else objective
    if use_graphs:  # now with the optimizer known
        use_graphs, graph_status = plan_graphs(cfg, d.device, d.world, opt_name, batch_sampler is not None,
                                               step_objective)
    pos = restore(resumed, model, optimizer, scaler, sched, cfg, d, resume_path)
    graphed = (GraphedStep(model, wrapped, step_objective, optimizer, cfg.clip_grad, amp_dtype, d.device, cfg.accum,
                           sync if d.enabled else None, fallback=cfg.cuda_graph == "auto" and not d.enabled)
               if use_graphs else None)
    first_step = pos.step  # with graphs, this run's first steps are eager: kernels, optimizer state
    log = _open_log(cfg, d, {"event": "start", "stage": cfg.name, "step": pos.step, "world": d.world,
                             "device": str(d.device), "optimizer": opt_name, "lr": sched.peak_lr,
                             **sched.to_dict(), "resumed_from": resume_path, "config": cfg.to_dict(),
                             "cuda_graph": graph_status or "to be recorded"})
    saver = RunSaver(cfg, d, model, optimizer, scaler, sched, log, checkpoint_extra,
                     (resume_path, pos.step) if resume_path else None)
    meter = StepMeter(cfg.name, log, Progress(cfg.name, sched.total_steps, pos.step, cfg.log_every,
                                              enabled=cfg.progress and d.is_main), cfg.log_every, sched.total_steps)
    stopped = "completed"
    wrapped.train()
    try:
        with _SignalFlag() as sig:
            while pos.step < sched.total_steps and stopped == "completed":
                batches = _epoch_batches(loader, sampler, pos, cfg)
                while pos.step < sched.total_steps:
                    lr = sched.lr(pos.step)
                    set_lr(optimizer, lr)
                    replay = graphed if graphed is not None and graphed.active \
                        and pos.step >= first_step + graphed.eager_steps else None
                    names, sums, images = _forward_backward(wrapped, sync, step_objective, batches, scaler, cfg, d,
                                                            pos.step, amp_dtype, replay)
                    over_time = cfg.time_limit is not None and time.perf_counter() - t_start > cfg.time_limit
                    metrics, nonfinite, stop_signal, stop_time, images = _agree(
                        names, sums, sig.signum is not None, over_time, d, images)
                    if nonfinite:
                        log.write({"event": "nonfinite_loss", "stage": cfg.name, "step": pos.step + 1, **metrics})
                        raise NonFiniteLoss(pos.step + 1, metrics, saver.newest)
                    if replay is not None and replay.active:
                        replay.step(metrics)
                    else:
                        _optimizer_step(model, optimizer, scaler, cfg.clip_grad, metrics)
                    epoch_end = pos.advance(steps_per_epoch)
                    meter.record(pos.step, pos.epoch, metrics, images, lr, time.perf_counter() - t_start)
                    if on_step is not None:
                        on_step(pos.step, metrics)
                    saver.after_step(pos, epoch_end)
                    if stop_signal:
                        raise saver.interrupted(sig.signum, pos)
                    stopped = "time_limit" if stop_time else stopped
                    if stop_time or epoch_end:
                        break
        result = _finish(model, cfg, d, sched, pos, stopped, t_start, meter, saver.final(pos), opt_name,
                         graphed.status if graphed is not None else graph_status, _unreadable_images(dataset, d))
    finally:
        meter.close()
        _stop_workers(loader)
    return result


def _stop_workers(loader: DataLoader) -> None:
    """Shut the loader's persistent workers down now. They ignore SIGTERM (a group SIGTERM is the
    main process's to handle), and multiprocessing's exit handler terminates its children with
    SIGTERM and then joins them: after a run ended by an exception (an unreadable image under
    --strict-data, a dataset error in a worker) the loader outlives ``fit`` in the traceback, and
    that join waited forever."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        loader._iterator = None
