"""What ``fit`` is asked to do (``FitConfig``) and what it reports (``FitResult``)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn


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
    clip_grad: Optional[float] = None      # max gradient norm; None: not clipped
    compile: bool = False
    cuda_graph: str = "auto"               # replay steps from CUDA graphs (training/graphed.py): "auto"
                                           # where the step is static, "on" (refuse otherwise), "off"
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
    wandb: Optional[str] = None            # a Weights & Biases project to log to (rank 0)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accum", "log_every", "save_every_epochs", "keep_last"):
            _need(self, name, _is_int(getattr(self, name), 1), "an int >= 1")
        for name in ("max_steps", "warmup_steps", "save_every_steps"):
            v = getattr(self, name)
            _need(self, name, v is None or _is_int(v, 0 if name == "warmup_steps" else 1),
                  "None or an int >= " + ("0" if name == "warmup_steps" else "1"))
        for name in ("num_workers", "keep_every", "seed"):
            _need(self, name, _is_int(getattr(self, name), 0), "an int >= 0")
        _need(self, "blr", _is_real(self.blr) and self.blr > 0, "a finite number > 0")
        _need(self, "lr", self.lr is None or (_is_real(self.lr) and self.lr > 0), "None or a finite number > 0")
        for name in ("min_lr", "warmup_epochs", "weight_decay"):
            _need(self, name, _is_real(getattr(self, name)) and getattr(self, name) >= 0, "a finite number >= 0")
        for name in ("clip_grad", "time_limit"):
            v = getattr(self, name)
            _need(self, name, v is None or (_is_real(v) and v > 0), "None or a finite number > 0")
        self.betas = tuple(self.betas)
        _need(self, "betas", len(self.betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in self.betas),
              "two numbers in [0, 1)")
        _need(self, "precision", self.precision in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16")
        _need(self, "shard", self.shard in ("ddp", "fsdp"), "'ddp' or 'fsdp'")
        _need(self, "optimizer", self.optimizer in ("torch", "apex"), "'torch' or 'apex'")
        if isinstance(self.cuda_graph, bool):  # the flag's older form: True = require, False = off
            self.cuda_graph = "on" if self.cuda_graph else "off"
        _need(self, "cuda_graph", self.cuda_graph in ("auto", "on", "off"), "'auto', 'on' or 'off'")

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(cfg: FitConfig, name: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"FitConfig.{name} must be {what}, got {getattr(cfg, name)!r}")


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
    cuda_graph: str = ""               # whether the steps replayed from CUDA graphs and, if not, why
    unreadable: List[str] = field(default_factory=list)  # unreadable images every process met (replaced)
