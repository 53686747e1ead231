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
from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoint import read_checkpoint, save_atomic
from .monitor import MetricsLog, Progress
from .optim import build_optimizer, lr_at, set_lr

CHECKPOINT_FORMAT = "tec_fast.train/1"
LAST_CHECKPOINT = "checkpoint-last.pth"


# ------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


_DIST: Optional[DistInfo] = None


def setup_distributed(device: Optional[str] = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL on
    CUDA, gloo on CPU. Idempotent. One process otherwise."""
    global _DIST
    if _DIST is not None:
        return _DIST
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    _DIST = DistInfo(rank, world, local_rank, dev)
    return _DIST


def cleanup_distributed() -> None:
    global _DIST
    if dist.is_initialized():
        dist.destroy_process_group()
    _DIST = None


# ------------------------------------------------------------------------------------ seeds
_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from a tuple of ints (splitmix64 rounds)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded permutation per epoch, rank r takes every world-th index)
    that yields ``(index, sample_seed)``, stops after ``limit`` samples per epoch (the batches
    that make whole optimizer steps) and can start ``start`` samples into the epoch (resume)."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.start, self.limit = 0, self.num_samples

    def __iter__(self):
        indices = list(super().__iter__())[self.start:self.limit]
        return iter([(i, mix_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self) -> int:
        return max(0, self.limit - self.start)

    def resume_at(self, micro_batches: int, batch_size: int) -> None:
        """Start the epoch after ``micro_batches`` batches of ``batch_size`` samples."""
        self.start = micro_batches * batch_size


class ResumableBatchSampler(torch.utils.data.Sampler):
    """The batch-sampler counterpart of ``ResumableSampler``, for variable-size batches.

    ``plan``: an iterable of batches (lists of dataset indices) covering the *global* epoch,
    deterministic given its ``set_epoch(epoch)`` (called here when it has one). Each epoch the
    plan is cut to a multiple of ``num_replicas`` batches and rank r takes batches r::world, so
    every rank runs the same number of micro-steps. Yields lists of ``(index, sample_seed)``
    (seeds as ``ResumableSampler``'s), from batch ``start`` up to ``limit`` (resume)."""

    def __init__(self, plan, num_replicas: int, rank: int, seed: int):
        self.plan, self.num_replicas, self.rank, self.seed = plan, num_replicas, rank, seed
        self.epoch, self.start = 0, 0
        first = self._global()
        self.num_batches = len(first) // num_replicas  # per rank, epoch 0
        kept = first[:self.num_batches * num_replicas]
        # mean images per (global) batch: the nominal batch size for the lr rule and the logs
        self.mean_batch_size = sum(len(b) for b in kept) / max(1, len(kept))
        self.limit = self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global(self) -> List[List[int]]:
        if hasattr(self.plan, "set_epoch"):
            self.plan.set_epoch(self.epoch)
        return [[int(i) for i in b] for b in self.plan]

    def batches(self) -> List[List[int]]:
        """This rank's batches of the current epoch (before ``start`` / ``limit``)."""
        bins = self._global()
        n = len(bins) // self.num_replicas
        return bins[:n * self.num_replicas][self.rank::self.num_replicas]

    def __iter__(self):
        mine = self.batches()
        if len(mine) < self.limit:
            raise RuntimeError(f"the batch plan of epoch {self.epoch} has {len(mine)} batches per process, "
                               f"fewer than the {self.limit} of epoch 0 the schedule was sized with")
        return iter([[(i, mix_seed(self.seed, self.epoch, i)) for i in b]
                     for b in mine[self.start:self.limit]])

    def __len__(self) -> int:
        return max(0, self.limit - self.start)

    def resume_at(self, micro_batches: int, batch_size: int) -> None:
        self.start = micro_batches


class SeededSamples(Dataset):
    """``ds[(index, seed)]`` = the wrapped ``ds[index]`` computed with torch / numpy / python
    RNGs seeded from ``seed`` (restored afterwards), so random augmentation is a function of the
    sample and the epoch only."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def masking_noise(seed: int, step: int, micro: int, global_batch: int, num_patches: int,
                  rank: int, world: int) -> torch.Tensor:
    """[global_batch / world, L] uniform noise: rows rank::world of the global batch's noise."""
    g = torch.Generator().manual_seed(mix_seed(seed, 0x6E6F697365, step, micro))
    return torch.rand(global_batch, num_patches, generator=g)[rank::world]


# -------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states as plain data (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------- errors
class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; raised before the optimizer step, nothing is saved."""

    def __init__(self, step: int, metrics: Dict[str, float]):
        super().__init__(f"non-finite loss at optimizer step {step} ({metrics}); stopped without "
                         f"saving a checkpoint (the last good one is still on disk)")
        self.step, self.metrics = step, metrics


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived; a checkpoint was saved (when there is an output folder)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}; continue with --resume" if checkpoint else "no output folder, nothing saved"
        super().__init__(f"{name} received: stopped after optimizer step {step}; {where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class _SignalFlag:
    """SIGTERM/SIGINT set a flag the loop checks after each optimizer step (a step is never cut
    in half). A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ------------------------------------------------------------------------------ checkpoints
class CheckpointManager:
    """``checkpoint-EEEE.pth`` after epochs (keeping the last ``keep_last`` and every
    ``keep_every``-th), ``checkpoint-last.pth`` always the newest state (a hard link to the
    epoch file when possible, written atomically)."""

    _EPOCH_FILE = re.compile(r"^checkpoint-(\d+)\.pth$")

    def __init__(self, folder: str, keep_last: int = 2, keep_every: int = 0):
        self.folder, self.keep_last, self.keep_every = folder, max(1, keep_last), keep_every

    @property
    def last(self) -> str:
        return os.path.join(self.folder, LAST_CHECKPOINT)

    def save(self, state: dict, epoch_done: Optional[int] = None) -> str:
        os.makedirs(self.folder, exist_ok=True)
        if epoch_done is None:
            save_atomic(state, self.last)
            return self.last
        path = os.path.join(self.folder, f"checkpoint-{epoch_done:04d}.pth")
        save_atomic(state, path)
        tmp = os.path.join(self.folder, f".link-{os.getpid()}.pth")
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.link(path, tmp)
            os.replace(tmp, self.last)
        except OSError:  # no hard links here (some network file systems): write it again
            save_atomic(state, self.last)
        self._prune()
        return path

    def _prune(self) -> None:
        epochs = sorted(int(m.group(1)) for f in os.listdir(self.folder)
                        for m in [self._EPOCH_FILE.match(f)] if m)
        recent = set(epochs[-self.keep_last:])
        for e in epochs:
            if e not in recent and not (self.keep_every and e % self.keep_every == 0):
                os.unlink(os.path.join(self.folder, f"checkpoint-{e:04d}.pth"))


# ---------------------------------------------------------------------------------- config
@dataclass
class FitConfig:
    """Everything ``fit`` needs besides the model, the objective and the data."""

    name: str = "train"                    # stage name in logs ("tec", "mae")
    output_dir: Optional[str] = None       # checkpoints + metrics.jsonl; None: nothing written
    epochs: int = 1
    max_steps: Optional[int] = None        # optimizer steps; when set it is the schedule length
    time_limit: Optional[float] = None     # seconds: stop early (saving), schedule unchanged
    batch_size: int = 64                   # per process, per micro-step
    accum: int = 1                         # micro-steps per optimizer step
    blr: float = 1.5e-4                    # lr = blr * global batch / 256 ...
    lr: Optional[float] = None             # ... unless given
    min_lr: float = 0.0
    warmup_epochs: float = 40.0
    warmup_steps: Optional[int] = None     # overrides warmup_epochs
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    optimizer: str = "torch"               # "torch" | "apex"
    precision: str = "fp32"                # "fp32" | "bf16" | "fp16"
    clip_grad: Optional[float] = None
    compile: bool = False
    shard: str = "ddp"                     # under torchrun: "ddp" | "fsdp" (FSDP2 fully_shard)
    num_workers: int = 0
    pin_memory: bool = True
    seed: int = 0
    log_every: int = 10
    save_every_epochs: int = 1
    save_every_steps: Optional[int] = None
    keep_last: int = 2
    keep_every: int = 0
    resume: Optional[str] = None           # a checkpoint path, or "auto" (output_dir's last one)
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accum", "log_every", "save_every_epochs", "keep_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FitConfig.{name} must be an int >= 1, got {v!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"FitConfig.max_steps must be >= 1 or None, got {self.max_steps!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"FitConfig.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.shard not in ("ddp", "fsdp"):
            raise ValueError(f"FitConfig.shard must be 'ddp' or 'fsdp', got {self.shard!r}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    model: nn.Module                   # the trained model, unwrapped
    steps: int                         # optimizer steps done (in all, including before a resume)
    total_steps: int                   # schedule length
    epoch: int                         # epoch index the run stopped in (or the next to start)
    seconds: float                     # wall time of this call
    img_per_s: float                   # global images / s of this call's steps
    losses: List[float]                # per optimizer step of this call: global mean loss
    metrics: Dict[str, float]          # the last step's metrics
    stopped: str                       # "completed" | "time_limit"
    checkpoint: Optional[str]          # newest checkpoint written
    optimizer: str                     # which optimizer ran
    lr: float                          # peak learning rate
    global_batch: int


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


def _wrap_model(model: nn.Module, cfg: FitConfig, d: DistInfo):
    """(module to call, handle for gradient-sync control or None). DDP without
    find_unused_parameters, or FSDP2 with each transformer block its own unit."""
    sync = None
    if d.enabled and cfg.shard == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for name in ("blocks", "decoder_blocks"):
            for blk in getattr(model, name, []):
                fully_shard(blk)
        fully_shard(model)
        sync = model
    elif d.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        sync = model
    if cfg.compile:
        model = torch.compile(model)
    return model, sync


def _no_sync(sync, cfg: FitConfig, last_micro: bool):
    if sync is None or last_micro:
        if sync is not None and cfg.shard == "fsdp":
            sync.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if cfg.shard == "fsdp":
        sync.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return sync.no_sync()


def _model_state(model: nn.Module, optimizer, cfg: FitConfig, d: DistInfo):
    """(model state, optimizer state) as full, CPU-side state dicts."""
    if d.enabled and cfg.shard == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    return model.state_dict(), optimizer.state_dict()


def _load_optimizer_state(model: nn.Module, optimizer, state: dict, cfg: FitConfig, d: DistInfo):
    if d.enabled and cfg.shard == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def resolve_resume(resume: Optional[str], output_dir: Optional[str]) -> Optional[str]:
    """A checkpoint path from ``--resume`` (``auto``: the output folder's last one, if any)."""
    if resume is None:
        return None
    if resume == "auto":
        if output_dir and os.path.isfile(os.path.join(output_dir, LAST_CHECKPOINT)):
            return os.path.join(output_dir, LAST_CHECKPOINT)
        return None
    if os.path.isdir(resume):
        resume = os.path.join(resume, LAST_CHECKPOINT)
    if not os.path.isfile(resume):
        raise ValueError(f"--resume {resume!r}: no such checkpoint")
    return resume


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


def bench_loader(dataset: Dataset, cfg: FitConfig, seconds: float = 20.0, max_batches: int = 200,
                 batch_sampler=None, collate_fn: Optional[Callable] = None) -> dict:
    """The data loader alone (decode + augmentation + collation, no model): images/s of this
    process after the first batch (worker start-up excluded)."""
    d = setup_distributed()
    loader, sampler, _ = build_loader(dataset, cfg, d, batch_sampler=batch_sampler, collate_fn=collate_fn)
    sampler.set_epoch(0)
    batches = iter(loader)
    t0 = time.perf_counter()
    next(batches)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for _ in range(max_batches):
        try:
            batch = next(batches)
        except StopIteration:
            break
        n += batch_images(batch)
        if time.perf_counter() - t1 > seconds:
            break
    dt = time.perf_counter() - t1
    return {"img_per_s": n / dt if dt > 0 else float("nan"), "images": n, "seconds": dt,
            "first_batch_s": first, "num_workers": cfg.num_workers, "batch_size": cfg.batch_size}
