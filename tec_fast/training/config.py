"""What ``fit`` is asked to do (``FitConfig``) and what it reports (``FitResult``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
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
