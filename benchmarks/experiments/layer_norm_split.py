"""Where one ``tec_fast.ops.layer_norm`` call's host time goes, with Triton's launch path counted.

The op with a residual (``layer_norm(x, w, b, residual=r)``: y and h = x + r out, the gradients of
x, r, w and b back) on the host-overhead tool's ``tiny`` example, the interpreter off, its kernels
compiled once for sm_90 offline and only the driver call stubbed (as ``python -m
benchmarks.host_overhead --launch-path``). Each part is timed on its own, best of 5 repetitions
of this thread's CPU time: the public op forward and backward; its plain-torch reference
(``h = r + x``, ``F.layer_norm(h)``) forward and backward; an ``autograd.Function`` of the same inputs and outputs
that launches nothing (its forward returns views, its backward fresh tensors: what autograd
itself costs a Python node); the forward and backward launchers called directly, without
autograd; one reused launch. Why: it shows which part stands between the op and plain torch.

    python -m benchmarks.experiments.layer_norm_split
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

from benchmarks.experiments.launch_path_split import best_us, offline_args  # noqa: E402


class _Empty(torch.autograd.Function):
    """layer_norm's inputs and outputs, no work: what a Python autograd node costs."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        return x.view_as(x), residual.view_as(residual)

    @staticmethod
    def backward(ctx, dy, dh):
        _, weight = ctx.saved_tensors
        return dy, dh, torch.empty_like(weight), torch.empty_like(weight), None


def main(argv=None) -> int:
    args = offline_args("benchmarks.experiments.layer_norm_split", __doc__, argv, 5000)
    from benchmarks.common import format_table
    from benchmarks.triton_stub import driver_calls_stubbed
    from tec_fast import ops
    from tec_fast.kernels import layer_norm as m
    from tec_fast.kernels._common import eager_apply, launch
    from tec_fast.ops import dispatch, reference
    from tec_fast.ops.registry import OPS, SIZES

    dispatch.set_kernel_mode("triton")
    dispatch._SETTINGS["interpret"] = True  # CPU tensors take the Triton path (launches stop at the driver)
    torch.manual_seed(0)
    ex = OPS["layer_norm"].example(SIZES["tiny"], torch.float32, torch.device("cpu"))
    x, w, b, eps = ex.args
    r = ex.kwargs["residual"]
    leaves = [x, r, w, b]
    empty = eager_apply(_Empty)
    try:
        with driver_calls_stubbed(lambda name, a, k: None):
            outs = {"tec_fast.ops.layer_norm": ops.layer_norm(x, w, b, eps, residual=r),
                    "plain torch (the op's reference)": reference.layer_norm(x, w, b, eps, r),
                    "autograd.Function, no work": empty(x, r, w, b, eps)}
            grads = [torch.ones_like(o) for o in outs["tec_fast.ops.layer_norm"]]
            forwards = {"tec_fast.ops.layer_norm": lambda: ops.layer_norm(x, w, b, eps, residual=r),
                        "plain torch (the op's reference)": lambda: reference.layer_norm(x, w, b, eps, r),
                        "autograd.Function, no work": lambda: empty(x, r, w, b, eps)}
            rows = []
            for name, fwd in forwards.items():
                out = outs[name]
                rows.append(dict(part=name, fwd_us=best_us(fwd, args.calls), bwd_us=best_us(
                    lambda: torch.autograd.grad(out, leaves, grads, retain_graph=True), args.calls)))
            with torch.no_grad():
                xd, rd, wd, bd = (t.detach() for t in leaves)
                y, h, stats = m._layer_norm_fwd(xd, rd, wd, bd, eps)
                dy, dh = torch.ones_like(y), torch.ones_like(h)
                rows.append(dict(part="launchers alone (no autograd)",
                                 fwd_us=best_us(lambda: m._layer_norm_fwd(xd, rd, wd, bd, eps), args.calls),
                                 bwd_us=best_us(lambda: m._layer_norm_bwd(dy, dh, h, wd, stats, bd.dtype),
                                                args.calls)))
                rows_, C = h.numel() // h.shape[-1], h.shape[-1]
                block_c, num_warps = m._fwd_config(C)
                one = (xd, rd, wd, bd, y, h, stats, rows_, C, eps, C, C)
                meta = dict(HAS_RES=True, HAS_STATS=True, BLOCK_C=block_c, num_warps=num_warps)
                rows.append(dict(part="one reused launch (forward kernel)", fwd_us=best_us(
                    lambda: launch(m._layer_norm_fwd_kernel, (rows_,), *one, **meta), args.calls), bwd_us=None))
    finally:
        dispatch.reload_environment()
    print(f"layer_norm {ex.shape}, fp32, one thread; driver call stubbed")
    print(format_table(rows, ["part", "fwd_us", "bwd_us"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
