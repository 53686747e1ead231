"""Run by ``test_launch_reuse.py`` in a subprocess (the interpreter off, kernels compiled for sm_90
through the offline driver, the driver call stubbed): every registry op's example, forward and
backward, at two sizes and in fp32 and bf16, plus inputs at addresses that are not 16-byte
aligned, each twice, with ``TEC_FAST_LAUNCH=verify``: every reuse of a compiled kernel is
checked against the kernel and the arguments Triton's ``JITFunction.run`` picks. Prints the
number of checked reuses, and fails where a kernel that ran was never reused. With ``--plant-bug`` the call signature leaves the tensors' alignment
out, which the check must catch."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and os.environ.get("TEC_FAST_LAUNCH") == "verify"
import torch  # noqa: E402

import tec_fast.kernels._common as common  # noqa: E402
from benchmarks.triton_stub import driver_calls_stubbed  # noqa: E402
from tec_fast import ops  # noqa: E402
from tec_fast.ops import dispatch  # noqa: E402
from tec_fast.ops.registry import OPS, SIZES, outputs, unit_grads  # noqa: E402

dispatch.set_kernel_mode("triton")
dispatch._SETTINGS["interpret"] = True  # CPU tensors take the Triton path (launches stop at the driver)
checked = [0]
launched, reused = set(), set()  # kernel names
verify = common._verify_reuse


def counted(kernel, *args, **kwargs):
    checked[0] += 1
    reused.add(kernel.fn.__name__)
    return verify(kernel, *args, **kwargs)


common._verify_reuse = counted
if "--plant-bug" in sys.argv:
    common._tensor_key = lambda i: f"a{i}.dtype"  # a tensor's dtype only, not its address's alignment


def run(op, example):
    out = getattr(ops, op)(*example.args, **example.kwargs)
    if example.grad_of:
        outs = outputs(out)
        torch.autograd.grad(outs, example.grad_of, unit_grads(outs), allow_unused=True)


def misaligned(t):
    """``t``'s values at an address 4 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


with driver_calls_stubbed(lambda name, args, kwargs: launched.add(name)):
    for op, spec in OPS.items():
        for size in ("tiny", "vits"):
            for dtype in (torch.float32, torch.bfloat16):
                torch.manual_seed(0)
                shape = dict(SIZES[size], B=2) if size != "tiny" else SIZES[size]
                ex = spec.example(shape, dtype, torch.device("cpu"))
                run(op, ex)
                run(op, ex)
        ex = spec.example(SIZES["tiny"], torch.float32, torch.device("cpu"))  # then the same at odd addresses
        args = [misaligned(a) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() > 1 else a
                for a in ex.args]
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        ex = ex._replace(args=tuple(args), grad_of=leaves)
        run(op, ex)
        run(op, ex)
print(f"checked {checked[0]} reuses")
ex = OPS["layer_norm"].example(SIZES["tiny"], torch.float32, torch.device("cpu"))
with driver_calls_stubbed(lambda name, args, kwargs: None):
    # Triton's hooks that change what JITFunction.run does leave the reuse out: a custom pass
    # pipeline (Triton 3.9) compiles another kernel, so every launch takes Triton's own path ...
    from triton import knobs
    if common._HAS_STAGES_HOOK:
        before = checked[0]
        knobs.runtime.add_stages_inspection_hook = lambda *a: None if a else ("tec_fast check", "0")
        try:
            run("layer_norm", ex)
            run("layer_norm", ex)
        finally:
            knobs.runtime.add_stages_inspection_hook = None
        assert checked[0] == before, "a launch was reused under a custom pass pipeline"
    # ... and a kernel that a JIT cache hook declines (JITFunction.run compiles nothing and
    # returns None; a width no example has, so nothing is compiled for it yet) is not kept
    x, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((3, 7, 40), (40,), (40,)))
    knobs.runtime.jit_cache_hook = lambda *a, **k: True
    try:
        for _ in range(2):
            ops.layer_norm(x, w, b).sum().backward()
    finally:
        knobs.runtime.jit_cache_hook = None
# every example runs twice with the same inputs: a kernel never reused has a signature that
# differs per call (a launch configuration built anew per launch, say), so reuse never applies
never = sorted(launched - reused)
if never:
    sys.exit(f"kernels launched but never reused: {', '.join(never)}")
