"""``fit``'s optimizer step replayed from two CUDA graphs (``FitConfig.cuda_graph``).

Below a few hundred images per step a GPU runs a ViT step's kernels faster than the host can
launch them (measured on an H200: docs/performance.md). Replaying recorded graphs removes that
host work. The step is split in two graphs so that fit's guarantees hold unchanged:

1. forward + backward: the objective on static copies of the batch and the masking noise,
   writing the gradients and the step's metrics (the loss among them);
2. then, on the host, the one synchronisation per step that fit always makes (``_agree``): a
   non-finite loss stops training *before* the optimizer touches the weights;
3. the optimizer step: gradient clipping (the norm stays on the GPU until it is read as a
   metric) and torch's fused AdamW with ``capturable=True``; the learning rate lives in a GPU
   tensor that the schedule overwrites before each replay.

The first step of a run is eager: it compiles the Triton kernels and creates the optimizer's
state. The second records both graphs (after one forward + backward on a side stream, which
leaves the weights alone) and replays them; every later step only copies its batch in and
replays. What a recording fixes: one process, fixed-size batches, one micro-step per optimizer
step, bf16 or fp32, torch's fused AdamW, no ``torch.compile``. ``graph_reasons`` names what
stands in the way of a configuration.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from tec_fast.training import cuda_graph


def graph_reasons(cfg, device: torch.device, world: int, optimizer_name: str,
                  variable_batches: bool, objective=None) -> List[str]:
    """Why ``fit`` cannot record this run's step into CUDA graphs (empty: it can)."""
    reasons = []
    if getattr(objective, "variable", False):
        reasons.append("it needs one fixed mask ratio and random masks (a ratio range or block masks "
                       "change the shapes from batch to batch)")
    if getattr(objective, "cache", None) is not None:
        reasons.append("it cannot read a TargetCache (the lookup indexes a host tensor)")
    if device.type != "cuda":
        reasons.append(f"it needs a CUDA device (training runs on {device})")
    if world > 1:
        reasons.append(f"it runs in one process only ({world} under torchrun: DDP / FSDP2 "
                       f"communication is not recorded)")
    if cfg.accum != 1:
        reasons.append(f"it needs accum 1 (got {cfg.accum})")
    if cfg.precision == "fp16":
        reasons.append("fp16's loss scaler decides on the host whether to skip a step; use bf16 or fp32")
    if not optimizer_name.startswith("torch.optim.AdamW (fused)"):
        reasons.append(f"it needs torch's fused AdamW (this run has {optimizer_name})")
    if variable_batches:
        reasons.append("it needs batches of one fixed size (native-resolution plans vary)")
    if cfg.compile:
        reasons.append("it does not combine with compile (torch.compile's mode='reduce-overhead' "
                       "records graphs of its own)")
    return reasons


def _clone(batch):
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, (list, tuple)):
        return type(batch)(_clone(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _clone(v) for k, v in batch.items()}
    raise TypeError(f"cuda_graph: cannot hold a batch item of type {type(batch).__name__} in a "
                    f"graph (tensors, lists, tuples and dicts of them only)")


def _copy_into(static, batch) -> None:
    if isinstance(static, torch.Tensor):
        if batch.shape != static.shape:
            raise ValueError(f"cuda_graph: a batch item of shape {tuple(batch.shape)} does not fit the "
                             f"recorded shape {tuple(static.shape)}")
        static.copy_(batch, non_blocking=True)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], batch[k])
    else:
        for s, b in zip(static, batch):
            _copy_into(s, b)


class GraphedStep:
    """The two recorded graphs of one optimizer step and the static tensors they read and write."""

    def __init__(self, model: nn.Module, wrapped: nn.Module, objective, optimizer: torch.optim.Optimizer,
                 clip_grad: Optional[float], amp_dtype: Optional[torch.dtype], device: torch.device):
        self.model, self.wrapped, self.objective, self.optimizer = model, wrapped, objective, optimizer
        self.clip_grad, self.amp_dtype, self.device = clip_grad, amp_dtype, device
        for group in optimizer.param_groups:
            group["capturable"] = True  # the step count stays on the GPU
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        self.fwd_bwd = self.opt_step = None

    @property
    def recorded(self) -> bool:
        return self.fwd_bwd is not None

    def _forward_backward(self):
        # no autocast cache across a recording (torch's CUDA-graph notes): casts are recorded per use
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            out = self.objective(self.wrapped, self.batch, self.noise)
        out["loss"].backward()
        return list(out), torch.stack([out[k].detach().float() for k in out])

    def _optimizer_step(self):
        norm = None
        if self.clip_grad is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        return norm

    def record(self, batch, noise: Optional[torch.Tensor]) -> None:
        """Record both graphs around static copies of ``batch`` and ``noise`` (run once, after an
        eager step has created the optimizer state)."""
        self.batch, self.noise = _clone(batch), (None if noise is None else noise.clone())
        self._warm_up(self._forward_backward)  # the weights do not change
        self.optimizer.zero_grad(set_to_none=True)  # the recorded backward writes fresh gradients
        self.fwd_bwd, (self.names, self.sums) = self._record(self._forward_backward)
        self.opt_step, self.norm = self._record(self._optimizer_step, pool=self.fwd_bwd.pool())

    def _warm_up(self, fn) -> None:
        def fresh():
            self.optimizer.zero_grad(set_to_none=True)
            fn()
        cuda_graph.warm_up(fresh)

    def _record(self, fn, pool=None):
        return cuda_graph.record(fn, pool)

    def forward_backward(self, batch, noise: Optional[torch.Tensor]):
        """Copy the batch in and replay graph 1: (metric names, their values on the GPU)."""
        _copy_into(self.batch, batch)
        if noise is not None:
            self.noise.copy_(noise, non_blocking=True)
        self.fwd_bwd.replay()
        return self.names, self.sums

    def step(self, metrics: Dict[str, float]) -> None:
        """Replay graph 2 (clip, AdamW); the gradient norm goes to ``metrics`` when clipping."""
        self.opt_step.replay()
        if self.norm is not None:
            metrics["grad_norm"] = float(self.norm)
