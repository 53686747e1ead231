"""Host time of the TEC step of ``benchmarks/host_overhead.py`` with its ViT blocks taking each
route, against the eager baseline in the same run: every Triton launch skipped, one thread,
``TEC_FAST_KERNELS=triton`` for the other ops throughout.

* ``one node``: the engine as it runs (``ops.vit_blocks``' Triton path: one autograd node for a
  whole stack of blocks, its backward written out in Python);
* ``node per block``: each block one ``ops.vit_block`` call, one autograd node a block (what the
  engine ran before the stack became one node);
* ``block on torch``: the same ops, but each block through ``reference.vit_block`` (torch's own
  autograd graph of the block, its GELU and LayerNorms computed for real by torch's CPU kernels);
* ``part by part``: each block through its separate ops (``layer_norm``, ``qkv_heads``, attention,
  ``mlp``: four autograd Functions and torch's nodes between them), what the engine ran before
  the one-node block.

Why: whether one node per block, and one per stack, save host time against torch's own graph of
the same block, not only against the per-op path they replaced.

    python -m benchmarks.experiments.block_routes            # 9 interleaved repetitions
"""
from __future__ import annotations

import os
import sys
from unittest import mock

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["TEC_FAST_KERNELS"] = "triton"

import torch  # noqa: E402

from tec_fast.cli.flags import POSITIVE  # noqa: E402

ROUTES = ("one node", "node per block", "block on torch", "part by part")


def make_steps():
    """{route or "eager": step()}: each step switches its route on around itself."""
    from benchmarks.host_overhead import make_step
    from tec_fast.models import layers
    from tec_fast.ops import dispatch, reference
    cpu = torch.device("cpu")
    engine, eager = make_step("engine", cpu), make_step("eager", cpu)
    fast = dispatch.fast_impl("vit_block")

    def on_torch(x, *args):  # the fast path's signature: (x, 12 tensors, heads, eps, pending)
        return reference.vit_block(x, *args[:-1], pending=args[-1])

    def per_block():
        with mock.patch.object(layers, "_one_op_stack", lambda blocks: None):
            engine()

    def block_on_torch():
        dispatch._FAST["vit_block"] = on_torch
        try:
            per_block()
        finally:
            dispatch._FAST["vit_block"] = fast

    def part_by_part():
        with mock.patch.object(layers, "_one_op_stack", lambda blocks: None), \
                mock.patch.object(layers, "_one_op_tensors", lambda block: None):
            engine()
    return {"one node": engine, "node per block": per_block, "block on torch": block_on_torch,
            "part by part": part_by_part, "eager": eager}


def main(argv=None) -> int:
    from benchmarks.common import make_parser
    p = make_parser("experiments.block_routes", __doc__)
    p.add_argument("--reps", type=POSITIVE, default=9, metavar="N",
                   help="interleaved timed repetitions, best reported (default 9)")
    p.add_argument("--steps", type=POSITIVE, default=3, metavar="N", help="steps per repetition (default 3)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.common import format_table
    from benchmarks.host_overhead import LaunchLog, denormals_flushed, time_per_call
    from benchmarks.triton_stub import launches_stubbed
    from tec_fast.ops import dispatch
    mode = dispatch.kernel_mode()
    dispatch.set_kernel_mode("triton")
    cpu = torch.device("cpu")
    try:
        steps = make_steps()
        with launches_stubbed(LaunchLog()), denormals_flushed(cpu):
            us = time_per_call(steps, args.steps, args.reps, cpu)
    finally:
        dispatch.set_kernel_mode(mode)
    rows = [dict(route=name, host_ms=round(us[name]["min"] / 1e3, 2),
                 host_ms_median=round(us[name]["median"] / 1e3, 2),
                 vs_eager=round(us[name]["min"] / us["eager"]["min"], 3)) for name in steps]
    print(format_table(rows, ["route", "host_ms", "host_ms_median", "vs_eager"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
