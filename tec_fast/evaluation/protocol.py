"""The papers' evaluation protocols run by ``tec_fast.training.fit``: MAE's linear probe
(``linprobe``) and fine-tuning (``finetune``). ``fit`` brings what ``train`` has: checkpoints
written atomically and resumed exactly, torchrun (DDP), the metrics log (JSON lines, CSV, wandb),
progress, the non-finite guard and signal handling; this module adds the models, the augmentation,
the optimizers and the top-1 on the test split.

``RECIPES`` holds every number of both recipes, as MAE's scripts and paper give them for ViT-B/16
(fine-tuning ViT-L/H: layer decay 0.75, drop path 0.2 (L) / 0.3 (H), 50 epochs, blr 1e-3). The
batch is the *global* batch per optimizer step (processes x accumulation x per-process batch).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tec_fast.evaluation.augment import Augmented, MixupCutmix, RandAugment, TrainTransform
from tec_fast.evaluation.finetune import FinetuneModel, layer_decay_optimizer
from tec_fast.evaluation.linprobe import LinearProbeModel, lars_optimizer
from tec_fast.evaluation.probe import Progress, split_folder

PROTOCOLS = ("linprobe", "finetune")


@dataclass(frozen=True)
class Recipe:
    """One protocol's hyper-parameters (field names = the eval command's flags)."""
    epochs: int
    batch_size: int           # global images per optimizer step
    accum: int                # micro-steps per optimizer step
    blr: float                # lr = blr x batch_size / 256 ...
    lr: Optional[float]       # ... unless given
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    pool: str                 # linprobe: 'cls' or 'mean' features; finetune: 'mean' = global pool + new LN
    crop_scale: float         # RandomResizedCrop's smallest area fraction
    layer_decay: float        # finetune only
    drop_path: float          # finetune only
    mixup: float              # finetune only: Beta alpha (0: off)
    cutmix: float             # finetune only: Beta alpha (0: off)
    smoothing: float          # finetune only: label smoothing
    randaug_n: int            # finetune only: RandAugment ops per image (0: off)
    randaug_m: float          # finetune only: RandAugment magnitude (0-10)
    randaug_mstd: float       # finetune only: its Gaussian jitter
    reprob: float             # finetune only: random erasing probability

    def __post_init__(self):
        for name in ("epochs", "batch_size", "accum"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        checks = {"blr": self.blr > 0, "lr": self.lr is None or self.lr > 0, "min_lr": self.min_lr >= 0,
                  "warmup_epochs": self.warmup_epochs >= 0, "weight_decay": self.weight_decay >= 0,
                  "pool": self.pool in ("cls", "mean"), "crop_scale": 0 < self.crop_scale <= 1,
                  "layer_decay": 0 < self.layer_decay <= 1, "drop_path": 0 <= self.drop_path < 1,
                  "mixup": self.mixup >= 0, "cutmix": self.cutmix >= 0, "smoothing": 0 <= self.smoothing < 1,
                  "randaug_n": self.randaug_n >= 0, "randaug_m": 0 <= self.randaug_m <= 10,
                  "randaug_mstd": self.randaug_mstd >= 0, "reprob": 0 <= self.reprob <= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range")

    def to_dict(self) -> dict:
        return asdict(self)


_COMMON = dict(accum=1, lr=None, crop_scale=0.08)
RECIPES = {
    "linprobe": Recipe(epochs=90, batch_size=16384, blr=0.1, min_lr=0.0, warmup_epochs=10, weight_decay=0.0,
                       pool="cls", layer_decay=1.0, drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
                       randaug_n=0, randaug_m=0.0, randaug_mstd=0.0, reprob=0.0, **_COMMON),
    "finetune": Recipe(epochs=100, batch_size=1024, blr=5e-4, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
                       pool="mean", layer_decay=0.65, drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1,
                       randaug_n=2, randaug_m=9.0, randaug_mstd=0.5, reprob=0.25, **_COMMON),
}
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


def recipe(protocol: str, **overrides) -> Recipe:
    """``RECIPES[protocol]`` with the given (non-None) values replaced."""
    if protocol not in RECIPES:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return replace(RECIPES[protocol], **{k: v for k, v in overrides.items() if v is not None})


class ClassifierObjective:
    """Cross-entropy of the model's logits (label-smoothed), or, with ``mix``, soft-target
    cross-entropy on a mixup / cutmix batch. ``random_forward`` (stochastic depth): the forward runs
    under torch's RNG seeded for this micro-step. The seed and the mixing choices come from ``fit``'s
    per-step noise, a function of (seed, step, micro-step, process), so a resumed run draws exactly
    what an uninterrupted one draws, whatever else draws from the global RNG in between."""

    def __init__(self, mix: Optional[MixupCutmix] = None, smoothing: float = 0.0, random_forward: bool = False):
        self.mix, self.smoothing, self.random_forward = mix, smoothing, random_forward
        self.noise_columns = 1 if mix is not None or random_forward else None

    def __call__(self, model: nn.Module, batch, noise: Optional[torch.Tensor]):
        images, labels = batch
        seed = int(noise[0, 0].item() * 2 ** 62) if noise is not None else None
        targets = None
        if self.mix is not None:
            images, targets = self.mix(images, labels, np.random.default_rng(seed))
        logits = self._forward(model, images, seed).float()
        if targets is not None:
            return {"loss": torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()}
        return {"loss": F.cross_entropy(logits, labels, label_smoothing=self.smoothing),
                "train_top1": (logits.argmax(1) == labels).float().mean()}

    def _forward(self, model: nn.Module, images: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
        if not self.random_forward:
            return model(images)
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return model(images)


def build_model(protocol: str, encoder: nn.Module, num_classes: int, r: Recipe) -> nn.Module:
    if protocol == "linprobe":
        return LinearProbeModel(encoder, num_classes, pool=r.pool)
    return FinetuneModel(encoder, num_classes, drop_path=r.drop_path, global_pool=r.pool == "mean")


def build_training(protocol: str, num_classes: int, r: Recipe, mean: Sequence[float], std: Sequence[float]):
    """(train transform, objective, make_optimizer) of a protocol."""
    if protocol == "linprobe":
        return (TrainTransform(mean, std, crop_scale=(r.crop_scale, 1.0)), ClassifierObjective(),
                lars_optimizer(weight_decay=r.weight_decay))
    rand = RandAugment(r.randaug_n, r.randaug_m, r.randaug_mstd, fill=mean) if r.randaug_n else None
    mix = MixupCutmix(num_classes, r.mixup, r.cutmix, smoothing=r.smoothing)
    return (TrainTransform(mean, std, crop_scale=(r.crop_scale, 1.0), rand_augment=rand, reprob=r.reprob),
            ClassifierObjective(mix if mix.enabled else None, r.smoothing, random_forward=r.drop_path > 0),
            layer_decay_optimizer(weight_decay=r.weight_decay, layer_decay=r.layer_decay))


@torch.no_grad()
def top1(model: nn.Module, dataset, batch_size: int = 256, num_workers: int = 0, amp_dtype=None) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (in eval mode): ``top1_counts``' ratio;
    ValueError when no image of it is readable (a 0% would be no measurement)."""
    correct, seen = top1_counts(model, dataset, batch_size, num_workers, amp_dtype)
    _refuse_nothing_seen(seen, dataset)
    return correct / seen


def _refuse_nothing_seen(seen: int, dataset, after: str = "") -> None:
    """ValueError naming the test split's folder when none of its images was read."""
    if seen == 0:
        raise ValueError(f"none of the {len(dataset)} test images{split_folder(dataset)} is readable: no "
                         f"top-1 to report{after}")


@torch.no_grad()
def top1_counts(model: nn.Module, dataset, batch_size: int = 256, num_workers: int = 0,
                amp_dtype=None, progress: Optional[Progress] = None) -> Tuple[int, int]:
    """(correct, seen) of ``model`` on ``dataset`` (in eval mode). Items that are ``None`` (the
    unreadable images of a ``drop_unreadable`` dataset) are not seen: they count in neither.
    Under torchrun each process takes every world-th image and the counts are summed.
    ``progress(done, total)``: this process's images read so far, after every batch."""
    from tec_fast.data.dataset import collate_readable

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    part = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_readable)
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, seen
    done, total = 0, len(part)
    if progress is not None:
        progress(0, total)
    for batch in loader:
        done = min(done + batch_size, total)  # images read, the unreadable ones included
        if progress is not None:
            progress(done, total)
        if batch is None:
            continue
        images, labels = batch
        images, labels = images.to(device), torch.as_tensor(labels).to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        counts[0] += (logits.argmax(1) == labels).sum()
        counts[1] += len(labels)
    model.train(was_training)
    if world > 1:
        dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def run_protocol(protocol: str, encoder: nn.Module, train_ds, test_ds, num_classes: int, r: Recipe,
                 mean: Sequence[float], std: Sequence[float], fit_options: dict, eval_batch: int = 256,
                 test_progress: Optional[Progress] = None) -> dict:
    """Train the protocol's model with ``fit`` and measure top-1 on ``test_ds``. ``fit_options``:
    ``FitConfig`` fields other than the recipe's (output_dir, seed, precision, resume, ...);
    ``test_progress(done, total)``: called while the test split is scored.
    Returns the result record (plain data; ``test_images``: the test images read, unreadable ones
    of a ``drop_unreadable`` test set left out; ``train_unreadable``: the training images every
    process found unreadable, each replaced by another). ValueError when none of them is readable."""
    from tec_fast.training import FitConfig, fit, setup_distributed
    from tec_fast.training.saving import weights_digest

    d = setup_distributed(fit_options.get("device"))
    per_process = r.batch_size / (d.world * r.accum)
    if per_process != int(per_process) or per_process < 1:
        raise ValueError(f"--batch-size {r.batch_size} (the global batch) must be a multiple of "
                         f"{d.world} processes x --accum {r.accum}")
    if int(per_process) * r.accum * d.world > len(train_ds):
        raise ValueError(f"--batch-size {r.batch_size} is larger than the training split ({len(train_ds)} "
                         f"images): give a smaller --batch-size (the paper's is for ImageNet)")
    opts = {k: v for k, v in fit_options.items() if k != "device"}
    cfg = FitConfig(name=protocol, epochs=r.epochs, batch_size=int(per_process), accum=r.accum, blr=r.blr,
                    lr=r.lr, min_lr=r.min_lr, warmup_epochs=r.warmup_epochs, weight_decay=r.weight_decay,
                    betas=(0.9, 0.999), cuda_graph=False, keep_last=1, keep_every=0, **opts)
    digest = weights_digest(encoder)  # the weights given, before the protocol's model is built around them
    torch.manual_seed(cfg.seed)
    model = build_model(protocol, encoder, num_classes, r)
    transform, objective, make_optimizer = build_training(protocol, num_classes, r, mean, std)
    extra = {"protocol": protocol, "recipe": r.to_dict(), "num_classes": num_classes,
             "encoder_config": encoder.config.to_dict()}
    source = getattr(getattr(encoder, "load_report", None), "source", "")
    if source and source != "<dict>":  # which encoder file: a resume with another one is refused
        extra["encoder_source"] = os.path.abspath(source)
    extra["encoder_digest"] = digest  # and its weights: the same ones moved elsewhere are the same encoder
    t0 = time.perf_counter()
    result = fit(model, objective, Augmented(train_ds, transform), cfg, make_optimizer=make_optimizer,
                 checkpoint_extra=extra)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    correct, seen = top1_counts(result.model, test_ds, eval_batch, cfg.num_workers, amp, progress=test_progress)
    _refuse_nothing_seen(seen, test_ds, f" (the trained model is in {result.checkpoint})" if result.checkpoint else "")
    accuracy = correct / seen
    return {"protocol": protocol, "top1": accuracy, "steps": result.steps, "total_steps": result.total_steps,
            "stopped": result.stopped, "epoch": result.epoch, "global_batch": result.global_batch,
            "peak_lr": result.lr, "optimizer": result.optimizer, "seconds": round(time.perf_counter() - t0, 1),
            "img_per_s": result.img_per_s, "last_metrics": result.metrics, "checkpoint": result.checkpoint,
            "world": d.world, "precision": cfg.precision, "recipe": r.to_dict(),
            "train_images": len(train_ds), "test_images": seen, "num_classes": num_classes,
            "train_unreadable": list(result.unreadable)}
