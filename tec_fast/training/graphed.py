"""``fit``'s optimizer step replayed from CUDA graphs (``FitConfig.cuda_graph``, on by default
where the step is static).

Below a few hundred images per step a GPU runs a ViT step's kernels faster than the host can
launch them (measured on an H200: docs/performance.md). Replaying recorded graphs removes that
host work. The step is split so that fit's guarantees hold unchanged:

1. one micro-step: the objective on static copies of the batch and the masking noise, its loss
   divided by ``accum`` and backpropagated, the gradients *added* into gradient tensors that
   live for the whole run (as eager accumulation adds them), the metrics written into a static
   tensor. Replayed ``accum`` times per optimizer step, the batch copied in before each replay.
   Under DDP there are two recordings of it, one inside ``no_sync`` (the micro-steps before the
   last) and one with the gradient all-reduce (the last);
2. then, on the host, the one synchronisation per step that fit always makes (``_agree``): a
   non-finite loss stops training *before* the optimizer touches the weights;
3. the optimizer step: gradient clipping (the norm stays on the GPU until it is read as a
   metric), torch's fused AdamW with ``capturable=True`` (the learning rate lives in a GPU
   tensor that the schedule overwrites before each replay), then the gradients zeroed in place
   for the next step's accumulation.

The first steps of a run are eager (one in one process, ``DDP_EAGER_STEPS`` under DDP, which
needs them before a capture): they compile the Triton kernels, create the optimizer's state and
let DDP settle its buckets. The next step records the graphs (after one forward + backward on a
side stream, which leaves the weights alone) and replays them; every later step only copies its
batches in and replays. ``graph_reasons`` names what stands in the way of a configuration; with
``cuda_graph='auto'`` such a run stays eager and its summary says why.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from tec_fast.training import cuda_graph

# DDP's reducer logs runtime statistics during its first iterations (host reads of CUDA events);
# torch's CUDA-graph notes ask for 11 eager DDP iterations before a capture.
DDP_EAGER_STEPS = 11


def plan_graphs(cfg, device: torch.device, world: int, optimizer_name: Optional[str],
                variable_batches: bool, objective=None) -> Tuple[bool, str]:
    """(record this run's steps?, why not when it will not) for ``cfg.cuda_graph``: 'off' never
    records, 'auto' records where ``graph_reasons`` finds nothing in the way, 'on' raises
    ValueError naming the reasons where it does."""
    if cfg.cuda_graph == "off":
        return False, "off (cuda_graph='off', --no-cuda-graph)"
    reasons = graph_reasons(cfg, device, world, optimizer_name, variable_batches, objective)
    if not reasons:
        return True, ""
    if cfg.cuda_graph == "on":
        raise ValueError("cuda_graph: cannot record this run's step: " + "; ".join(reasons))
    return False, "eager: " + "; ".join(reasons)


def graph_reasons(cfg, device: torch.device, world: int, optimizer_name: Optional[str],
                  variable_batches: bool, objective=None) -> List[str]:
    """Why ``fit`` cannot record this run's step into CUDA graphs (empty: it can).
    ``optimizer_name`` None: the optimizer is not built yet and is not judged."""
    reasons = []
    if getattr(objective, "variable", False):
        reasons.append("it needs one fixed mask ratio and random masks (a ratio range or block masks "
                       "change the shapes from batch to batch)")
    if getattr(objective, "cache", None) is not None:
        reasons.append("it cannot read a TargetCache (the lookup indexes a host tensor)")
    if device.type != "cuda":
        reasons.append(f"it needs a CUDA device (training runs on {device})")
    if world > 1 and cfg.shard == "fsdp":
        reasons.append("it does not record FSDP2 (its parameter gathering is driven from the host); "
                       "DDP steps are recorded")
    if cfg.precision == "fp16":
        reasons.append("fp16's loss scaler decides on the host whether to skip a step; use bf16 or fp32")
    if optimizer_name is not None and not optimizer_name.startswith("torch.optim.AdamW (fused)"):
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


def _plain_param_groups(optimizer, state: dict) -> dict:
    """``optimizer.state_dict()`` hook: a float lr and capturable=False in the saved groups."""
    for group in state["param_groups"]:
        if torch.is_tensor(group.get("lr")):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state


class GraphedStep:
    """The recorded graphs of one optimizer step and the static tensors they read and write.

    ``accum``: micro-steps per optimizer step; ``sync``: the DDP module whose ``no_sync`` the
    micro-steps before the last run in (None in one process). ``fallback``: when the recording
    fails, say why (``status``) and let fit run eagerly instead of raising (one process only:
    under DDP the ranks would disagree on what to run)."""

    def __init__(self, model: nn.Module, wrapped: nn.Module, objective, optimizer: torch.optim.Optimizer,
                 clip_grad: Optional[float], amp_dtype: Optional[torch.dtype], device: torch.device,
                 accum: int = 1, sync=None, fallback: bool = False):
        self.model, self.wrapped, self.objective, self.optimizer = model, wrapped, objective, optimizer
        self.clip_grad, self.amp_dtype, self.device = clip_grad, amp_dtype, device
        self.accum, self.sync, self.fallback = accum, sync, fallback
        self.eager_steps = DDP_EAGER_STEPS if sync is not None else 1
        for group in optimizer.param_groups:
            group["capturable"] = True  # the step count stays on the GPU
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        # checkpoints hold the plain form, which any run (eager, on another device) loads
        optimizer.register_state_dict_post_hook(_plain_param_groups)
        self.fwd_bwd = self.fwd_bwd_local = self.opt_step = None
        self.failed: Optional[str] = None
        self.replays = 0  # optimizer steps replayed

    @property
    def recorded(self) -> bool:
        return self.fwd_bwd is not None

    @property
    def active(self) -> bool:
        return self.failed is None

    @property
    def status(self) -> str:
        """One line for the run's summary: whether the step replays and, if not, why."""
        if self.failed is not None:
            return f"eager: the recording failed ({self.failed})"
        if not self.recorded:
            return f"eager: the run ended within its first {self.eager_steps} step(s), which run eagerly"
        return f"replayed: {self.replays} step(s) from CUDA graphs (the first {self.eager_steps} eager)"

    def _forward_backward(self):
        # no autocast cache across a recording (torch's CUDA-graph notes): casts are recorded per use
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            out = self.objective(self.wrapped, self.batch, self.noise)
            loss = out["loss"] / self.accum
        loss.backward()
        return list(out), torch.stack([out[k].detach().float() for k in out])

    def _forward_backward_local(self):
        with self.sync.no_sync():
            return self._forward_backward()

    def _optimizer_step(self):
        norm = None
        if self.clip_grad is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        torch._foreach_zero_(self.grads)  # the next step's micro-steps add into them
        return norm

    def record(self, batch, noise: Optional[torch.Tensor]) -> None:
        """Record the graphs around static copies of ``batch`` and ``noise`` (run once, after the
        eager steps have created the optimizer state). With ``fallback``, a failed recording
        leaves ``failed`` set, the gradients cleared, and nothing raised."""
        try:
            self._record_all(batch, noise)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not self.fallback:
                raise
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            self.fwd_bwd = self.fwd_bwd_local = self.opt_step = None
            self.optimizer.zero_grad(set_to_none=True)

    def _record_all(self, batch, noise: Optional[torch.Tensor]) -> None:
        if self.device.type == "cuda":
            # the eager steps' cached blocks go back, so the graphs' own memory pool can take the
            # space (else a large step holds its activations twice: cached and in the pool)
            torch.cuda.empty_cache()
        self.batch, self.noise = _clone(batch), (None if noise is None else noise.clone())
        self._warm_up(self._forward_backward)  # the weights do not change
        # The gradients the warm-up made become the run's gradient tensors, zeroed: every replayed
        # backward adds into them (parameters the loss does not reach keep grad None, as eager).
        self.grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        torch._foreach_zero_(self.grads)
        self.fwd_bwd, (self.names, self.sums) = self._record(self._forward_backward)
        pool = self.fwd_bwd.pool()
        if self.sync is not None and self.accum > 1:
            self.fwd_bwd_local, (_, self.sums_local) = self._record(self._forward_backward_local, pool)
        self.opt_step, self.norm = self._record(self._optimizer_step, pool=pool)

    def _warm_up(self, fn) -> None:
        def fresh():
            self.optimizer.zero_grad(set_to_none=True)
            fn()
        cuda_graph.warm_up(fresh)

    def _record(self, fn, pool=None):
        return cuda_graph.record(fn, pool)

    def micro_step(self, batch, noise: Optional[torch.Tensor], last: bool) -> Tuple[List[str], torch.Tensor]:
        """Copy one micro-batch in and replay its forward + backward (the all-reducing recording
        when ``last``): (metric names, their values on the GPU, valid until the next replay)."""
        _copy_into(self.batch, batch)
        if noise is not None:
            self.noise.copy_(noise, non_blocking=True)
        if last or self.fwd_bwd_local is None:
            self.fwd_bwd.replay()
            return self.names, self.sums
        self.fwd_bwd_local.replay()
        return self.names, self.sums_local

    def step(self, metrics: Dict[str, float]) -> None:
        """Replay the optimizer graph (clip, AdamW, gradients zeroed); the gradient norm goes to
        ``metrics`` when clipping."""
        self.opt_step.replay()
        self.replays += 1
        if self.norm is not None:
            metrics["grad_norm"] = float(self.norm)
