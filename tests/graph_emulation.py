"""fit's CUDA-graph path on CPU with the recording emulated (used by tests/training/test_cuda_graph.py and
its DDP worker; the real recording runs in tests/training/test_step_gpu.py)."""
from __future__ import annotations

import copy

import torch


class EmulatedGraph:
    """A recorded graph's stand-in on CPU: a replay runs the recorded function again and copies
    its results into the tensors the recording returned (as a replay refreshes them)."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def pool(self):
        return None

    def replay(self):
        self.replays += 1
        for static, new in zip(_tensors(self.out), _tensors(self.fn())):
            static.copy_(new)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def emulated_step_class():
    """GraphedStep with the recording emulated: recording runs the function on a snapshot of the
    weights, gradients and optimizer state and restores them (a real recording runs nothing);
    replays run it again. Everything else is fit's own graph path."""
    from tec_fast.training.graphed import GraphedStep

    class EmulatedStep(GraphedStep):
        instances = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for group in self.optimizer.param_groups:
                group["capturable"] = False  # torch's AdamW records on GPUs only
            EmulatedStep.instances.append(self)

        def _warm_up(self, fn):
            self.optimizer.zero_grad(set_to_none=True)
            fn()

        def _record(self, fn, pool=None):
            params = list(self.model.parameters())
            saved = copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict())
            grads = [None if p.grad is None else p.grad.clone() for p in params]
            out = fn()
            lrs = [group["lr"] for group in self.optimizer.param_groups]
            self.model.load_state_dict(saved[0])
            self.optimizer.load_state_dict(saved[1])
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr  # the recorded step reads this tensor (saved: a plain float)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad.copy_(g)  # the same tensor: the replays add into it
            return EmulatedGraph(fn, out), out

    return EmulatedStep
