"""torchrun set-up: process group, device, DDP / FSDP2 wrapping, gradient-sync control and
the (sharded) model and optimizer state a checkpoint holds."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from tec_fast.training.config import FitConfig
from tec_fast.training.run_lock import hold_output_lock


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


def cleanup_distributed(barrier: bool = False) -> None:
    """Shut the process group down (the commands call it on the way out, error or not): a torchrun
    worker that exits with gloo's threads still running can abort in teardown ("terminate called
    without an active exception", exit -6) after its work was done. ``barrier``: first wait until
    every rank got here (only on a path every rank takes: a rank that failed never arrives)."""
    global _DIST
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _DIST = None


@contextlib.contextmanager
def distributed_command(device: Optional[str], output: str, lock: bool = True) -> Iterator[DistInfo]:
    """What a command that trains needs around its work: the torchrun set-up, rank 0's lock on the
    output folder (``run_lock``; none with ``lock=False``, for work that writes nothing there), and
    the process group shut down on the way out, error or not."""
    d = setup_distributed(device)
    try:
        if d.is_main and lock:
            with hold_output_lock(output):
                yield d
        else:
            yield d
    except BaseException:
        cleanup_distributed()
        raise
    cleanup_distributed(barrier=True)


def _wrap_model(model: nn.Module, cfg: FitConfig, d: DistInfo, static_graph: bool = False):
    """(module to call, handle for gradient-sync control or None). DDP without
    find_unused_parameters, or FSDP2 with each transformer block its own unit. ``static_graph``:
    the steps will be recorded into CUDA graphs (``graphed.py``): DDP with ``static_graph=True``,
    built on a side stream on CUDA (torch's notes on capturing DDP)."""
    sync = None
    if d.enabled and cfg.shard == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for name in ("blocks", "decoder_blocks"):
            for blk in getattr(model, name, []):
                fully_shard(blk)
        fully_shard(model)
        sync = model
    elif d.enabled:
        side = torch.cuda.Stream() if static_graph and d.device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                static_graph=static_graph)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
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
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    return model.state_dict(), optimizer.state_dict()


def _load_optimizer_state(model: nn.Module, optimizer, state: dict, cfg: FitConfig, d: DistInfo):
    if d.enabled and cfg.shard == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )
        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
