"""Every tensor argument of every op, made non-contiguous (last dimension stride 2, or rows
twice as far apart) with the same values: the Triton path returns what it returns for the
contiguous tensor, and the same gradients. A kernel that reads an argument densely must be
handed a dense one; before the test, a strided ids_keep (masked_gather), ids_restore or
mask_token (scatter_masked) or LayerNorm weight (vit_block) gave silently wrong results."""
from typing import List

import pytest
import torch

from conftest import strided_copy
from tec_fast import ops
from tec_fast.ops.registry import OPS, SIZES, outputs


def _slots(args) -> List[tuple]:
    """(position, index in a list or None) of every tensor argument with at least one dim."""
    slots = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim():
            slots.append((i, None))
        elif isinstance(a, list):
            slots += [(i, j) for j, t in enumerate(a) if isinstance(t, torch.Tensor) and t.dim()]
    return slots


def _leaves(args) -> List[torch.Tensor]:
    flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


def _fresh(a):
    if isinstance(a, list):
        return [_fresh(t) for t in a]
    return a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a


def _run(name, args, kwargs):
    outs = getattr(ops, name)(*args, **kwargs)
    outs = outputs(outs) or [o for o in (outs if isinstance(outs, tuple) else (outs,))]
    leaves = _leaves(args)
    if not leaves:
        return outs, []
    torch.manual_seed(1)
    weights = [torch.randn(o.shape).to(o.dtype) for o in outs]
    return outs, torch.autograd.grad(outs, leaves, weights, allow_unused=True)


@pytest.mark.parametrize("name", list(OPS))
def test_strided_arguments_give_the_contiguous_results(name, triton_path):
    torch.manual_seed(0)
    ex = OPS[name].example(SIZES["tiny"], torch.float32, torch.device("cpu"))
    want_out, want_grads = _run(name, ex.args, ex.kwargs)
    checked = 0
    for i, j in _slots(ex.args):
        for how in ("last", "rows"):
            args = [_fresh(a) for a in ex.args]  # new leaves: each run's gradients are its own
            if j is None:
                args[i] = strided_copy(args[i], how)
            else:
                args[i][j] = strided_copy(args[i][j], how)
            got_out, got_grads = _run(name, args, ex.kwargs)
            where = f"{name}: argument {i}" + ("" if j is None else f"[{j}]") + f" strided ({how})"
            for g, w in zip(got_out, want_out):
                assert torch.equal(g, w), f"{where}: output differs by {float((g - w).abs().max()):.3g}"
            for g, w in zip(got_grads, want_grads):
                assert (g is None) == (w is None), where
                if g is not None:
                    assert torch.equal(g, w), f"{where}: gradient differs by {float((g - w).abs().max()):.3g}"
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("name", [n for n in OPS if n != "relation_targets"])  # no backward
def test_strided_incoming_gradients_give_the_contiguous_gradients(name, triton_path):
    """The gradients autograd hands a backward are laid out however the code after the op made
    them (a transpose, a slice): every layout gives the gradients a contiguous one gives."""
    torch.manual_seed(0)
    ex = OPS[name].example(SIZES["tiny"], torch.float32, torch.device("cpu"))
    outs = outputs(getattr(ops, name)(*ex.args, **ex.kwargs))
    torch.manual_seed(1)
    weights = [torch.randn(o.shape).to(o.dtype) for o in outs]
    want = torch.autograd.grad(outs, ex.grad_of, weights, retain_graph=True, allow_unused=True)
    layouts = {"last": lambda w: strided_copy(w, "last"), "rows": lambda w: strided_copy(w, "rows"),
               "transposed": lambda w: w.transpose(-1, -2).contiguous().transpose(-1, -2)}
    for how, make in layouts.items():
        laid = [make(w) if w.dim() >= 2 or (w.dim() == 1 and how != "transposed") else w for w in weights]
        got = torch.autograd.grad(outs, ex.grad_of, laid, retain_graph=True, allow_unused=True)
        for i, (g, w) in enumerate(zip(got, want)):
            assert (g is None) == (w is None)
            if g is not None:
                assert torch.equal(g, w), f"{name}: gradient {i} with {how} incoming gradients differs"
