"""Mixed precision without per-weight casts: the frozen base's GEMM weights stored once in the
autocast dtype (``autocast_copy``), the trained model's cast in one multi-tensor kernel per step
(``CastWeightsOnce``).

Under autocast every Linear / convolution casts its fp32 weight and bias to the autocast dtype
at each call, and the engine's fused ops (``ops.qkv_heads``, ``ops.mlp``, ``ops.patch_embed``)
do the same explicitly; autograd then casts each weight's gradient back in its own kernel. At
ViT-B that is about 100 small kernels per step for the frozen base, whose values never change,
and about 130 for the weights of the model being trained and their gradients. In the H200
profile of a B=256 step (``benchmarks/results/device_logs/2026-11-30_profile_step.log``), the
299 ``aten::copy_`` calls other than 25 strided copies, mostly such casts, took 2.6 ms of GPU
time, 8.6 us each.

Both helpers give bitwise the values and gradients plain autocast gives: the casts they do are
the ones autocast would have made, to the same dtype (tests/models/test_precision.py, on the reference
and the Triton path). LayerNorm weights, tokens and position embeddings are left to autocast by
both; ``CastWeightsOnce`` also leaves the biases (the fused ops keep their gradients in fp32).
Neither changes the module it is given: ``autocast_copy`` returns a copy, ``CastWeightsOnce``
runs a structural copy of its own. ``fit`` uses both for bf16 / fp16 runs and names them
(``CastWeightsOnce`` in one process only, see its docstring; the base through the objective's
``for_precision``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

# The layers whose parameters every op that reads them under autocast casts to the autocast dtype
# (F.linear / conv by autocast's policy; the engine's fused ops explicitly).
MATMUL_LAYERS = (nn.Linear, nn.Conv2d)


def _check_low_precision(dtype: torch.dtype, who: str) -> None:
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{who}: dtype must be torch.bfloat16 or torch.float16, got {dtype}")


def autocast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the frozen ``module`` with the weights and biases of its Linear and Conv2d
    layers in ``dtype`` (``torch.bfloat16`` or ``torch.float16``), for running under
    ``torch.autocast(..., dtype=dtype)`` only: outside autocast its layers would see inputs of
    another dtype than their weights. The copy is made without a second fp32 copy of those
    weights (it adds about half the module's fp32 size while the original is kept); ``module``
    itself is left as it was."""
    _check_low_precision(dtype, "autocast_copy")
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"autocast_copy: the module must be frozen (its weights are cast once), but "
                         f"{len(trainable)} parameters require grad, e.g. {trainable[0]!r}")
    memo = {}
    for layer in module.modules():
        if isinstance(layer, MATMUL_LAYERS):
            for p in layer.parameters(recurse=False):
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(module, memo)


class _CastWeights(torch.autograd.Function):
    """fp32 weights -> their copies in ``dtype`` with one multi-tensor copy, and the copies'
    gradients back to the weights' dtype with another."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.dtypes = [w.dtype for w in weights]
        low = [torch.empty_like(w, dtype=dtype) for w in weights]
        torch._foreach_copy_(low, list(weights))
        return tuple(low)

    @staticmethod
    def backward(ctx, *grads):
        index = [i for i, g in enumerate(grads) if g is not None]
        out = [None] * len(grads)
        full = [torch.empty_like(grads[i], dtype=ctx.dtypes[i]) for i in index]
        if full:
            torch._foreach_copy_(full, [grads[i] for i in index])
        for i, g in zip(index, full):
            out[i] = g
        return (None, *out)


def _structural_copy(module: nn.Module, layers: set, memo: dict) -> nn.Module:
    """A copy of ``module``'s tree of submodules that shares everything with it (parameters,
    buffers, hooks, attributes) except its own ``_modules`` dicts and, for the layers in
    ``layers``, their ``_parameters`` dicts: a module structure whose weights can be pointed
    at other tensors without touching ``module``."""
    if id(module) in memo:
        return memo[id(module)]
    out = memo[id(module)] = copy.copy(module)
    out._modules = {name: None if child is None else _structural_copy(child, layers, memo)
                    for name, child in module._modules.items()}
    if id(module) in layers:
        out._parameters = dict(module._parameters)
    return out


class CastWeightsOnce(nn.Module):
    """Runs ``module`` (being trained, fp32 weights) under autocast with the weights of its
    Linear and Conv2d layers cast to ``dtype`` in one multi-tensor kernel per step, and their
    gradients cast back in one, where autocast casts each weight in its own kernel at first use
    and autograd each gradient in its own (ViT-B TEC: 75 such weights). Every op that
    reads these weights under autocast casts them to the autocast dtype itself, so the values
    and the gradients are bitwise the same. Biases, norms and tokens are left to autocast: the
    fused ops keep some bias gradients in fp32.

    ``module`` itself is never changed: the wrapper runs its own structural copy of it
    (``runner``: the same parameters, buffers and hooks, its own submodule objects), whose
    matmul layers read the step's cast weights. The copy is made here, so build the wrapper
    after ``module`` is on its device and complete (``fit`` does). ``train``/``eval`` reach both.

    Outside autocast to ``dtype``, or without grad, it calls ``module`` as is. For one process
    only: under DDP every weight's gradient would become ready at the end of the backward,
    after the others, and the gradient all-reduce would lose its overlap with the backward."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        _check_low_precision(dtype, "CastWeightsOnce")
        self.module, self.dtype = module, dtype
        found = [(name, layer) for name, layer in module.named_modules()
                 if isinstance(layer, MATMUL_LAYERS) and layer.weight.requires_grad
                 and layer.weight.dtype == torch.float32]
        self.names = [f"{name}.weight" if name else "weight" for name, _ in found]
        self._layers = [layer for _, layer in found]
        memo: dict = {}
        runner = _structural_copy(module, {id(layer) for layer in self._layers}, memo)
        # kept out of _modules: not a second copy of the parameters in state_dict / parameters()
        self.__dict__["runner"] = runner
        self._runner_layers = [memo[id(layer)] for layer in self._layers]

    def train(self, mode: bool = True) -> "CastWeightsOnce":
        super().train(mode)
        self.runner.train(mode)
        return self

    def forward(self, *args, **kwargs):
        weights = [layer.weight for layer in self._layers]
        device = weights[0].device.type if weights else "cpu"
        if not weights or not torch.is_grad_enabled() or not torch.is_autocast_enabled(device) \
                or torch.get_autocast_dtype(device) != self.dtype:
            return self.module(*args, **kwargs)
        low = _CastWeights.apply(self.dtype, *weights)
        # the runner's layers read this step's cast copies (torch.func.functional_call does the
        # same swap on the module itself, at about ten times the host time)
        layers = self._runner_layers
        for layer, w in zip(layers, low):
            layer._parameters["weight"] = w
        try:
            return self.runner(*args, **kwargs)
        finally:  # the cast copies live on only in the graph (freed by the backward)
            for layer, w in zip(layers, weights):
                layer._parameters["weight"] = w
