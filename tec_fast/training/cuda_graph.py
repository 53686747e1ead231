"""A whole training step recorded once into a CUDA graph and replayed.

On a GPU a step is a few hundred to a few thousand kernel launches. Below a few hundred images
per step the host cannot issue them as fast as the GPU runs them: each op costs tens of
microseconds of Python, dispatch and launch work, and the GPU waits. Replaying a recorded graph
issues the whole step with one call. It is possible because the TEC step makes no host
synchronisation (no ``.item()``, ``.tolist()`` or data-dependent shapes on the device path).

What a graph fixes in place: the input tensors' storage (copy each batch into the tensors the
step reads), the shapes, and the control flow of the recorded step. Random numbers drawn on the
GPU inside the step (the masking noise) are new at every replay. The optimizer must keep its
step count on the device (``capturable=True`` for torch's Adam/AdamW).

    step = capture_step(body, optimizer)   # body: zero_grad -> forward -> backward -> opt.step
    for images in loader:
        static_images.copy_(images)
        loss = step()                       # the tensors ``body`` returned, refreshed
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, TypeVar

import torch

T = TypeVar("T")


def _check_optimizer(optimizer: Optional[torch.optim.Optimizer]) -> None:
    if optimizer is None:
        return
    for i, group in enumerate(optimizer.param_groups):
        if "capturable" in group and not group["capturable"]:
            raise ValueError(f"capture_step: optimizer param_groups[{i}] has capturable=False; build "
                             f"{type(optimizer).__name__} with capturable=True so its step count stays "
                             f"on the GPU inside the graph")


def capture_step(body: Callable[[], T], optimizer: Optional[torch.optim.Optimizer] = None,
                 warmup: int = 3) -> Callable[[], T]:
    """Run ``body`` ``warmup`` times on a side stream, record one more call into a CUDA graph, and
    return a function that replays it and returns what the recorded call returned.

    ``body`` is one whole step: forward, backward and, when training, ``optimizer.step()``; it
    should start with ``optimizer.zero_grad(set_to_none=True)`` so the recorded backward writes
    the gradients afresh into storage that the graph owns, and run autocast with
    ``cache_enabled=False`` (torch's advice for recordings: no cast cached across one). The
    warm-up runs compile the Triton kernels and create the optimizer state outside the recording.
    Raises RuntimeError without CUDA and ValueError for an optimizer that cannot be captured.
    """
    if warmup < 1:
        raise ValueError(f"capture_step: warmup must be >= 1 (the first call compiles kernels and "
                         f"creates optimizer state, which cannot happen inside a recording), got {warmup}")
    _check_optimizer(optimizer)
    if not torch.cuda.is_available():
        raise RuntimeError("capture_step: CUDA graphs need a CUDA device; none is available")
    warm_up(body, warmup)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    graph, out = record(body)

    def replay() -> T:
        graph.replay()
        return out

    replay.graph = graph  # kept alive with the function; also lets a caller reset() it
    return replay


def warm_up(fn: Callable[[], object], times: int = 1) -> None:
    """Call ``fn`` ``times`` times on a side stream, so that lazy initialisations (Triton
    compiles, cuBLAS workspaces, optimizer state) happen before a recording, not inside it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def record(fn: Callable[[], T], pool=None) -> Tuple[torch.cuda.CUDAGraph, T]:
    """Record one call of ``fn`` into a new CUDA graph (sharing the memory ``pool`` of another
    graph when given): (graph, what ``fn`` returned; each replay refreshes those tensors). Recorded
    thread-locally, so another thread's CUDA calls (a data loader's pin-memory thread) do not
    invalidate the recording."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out
