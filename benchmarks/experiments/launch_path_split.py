"""Where one Triton launch's host time goes (Triton's own ``JITFunction.run``), measured offline.

The kernel (layer_norm's forward, 12 arguments and 3 constexprs, as the op launches it) is
compiled once for sm_90 through the offline driver of ``benchmarks/compile_report.py``; then
each part of a launch is timed on its own, best of 5 x 20 000 calls of this thread's CPU time:
the whole ``JITFunction.run`` with the driver call stubbed, Triton's argument binder, its cache
key, the launch-metadata call, and the compiled kernel's launcher call itself (stubbed). What
is left of the whole is the rest of ``run`` (option knobs, device and stream, hooks, the globals
check, the grid). Why: a launch that reused its compiled kernel without the binder and the key
would have to reproduce Triton's specialisation rules; this shows what each part would save.

    python -m benchmarks.experiments.launch_path_split
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402


def best_us(fn, calls: int = 20000, reps: int = 5) -> float:
    """The best of ``reps`` repetitions of ``calls`` calls of ``fn``: us of this thread's CPU time
    per call."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - t0) / calls * 1e6)
    return best


def offline_args(module: str, doc: str, argv, calls: int) -> argparse.Namespace:
    """The ``--calls`` command line of an offline launch-path experiment (``module``, described
    by the first paragraph of ``doc``), refused where the interpreter is on; one torch thread."""
    from benchmarks.common import make_parser
    from tec_fast.cli.flags import POSITIVE
    p = make_parser(module[len("benchmarks."):] if module.startswith("benchmarks.") else module, doc)
    p.add_argument("--calls", type=POSITIVE, default=calls, metavar="N",
                   help=f"calls per timed repetition (default {calls})")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("needs TRITON_INTERPRET unset before Triton is imported (run it as a module)")
    torch.set_num_threads(1)
    return args


def main(argv=None) -> int:
    args = offline_args("benchmarks.experiments.launch_path_split", __doc__, argv, 20000)
    from triton.runtime import driver
    from triton.runtime.jit import compute_cache_key

    from benchmarks.common import format_table
    from benchmarks.compile_report import _offline_driver
    from tec_fast.kernels import layer_norm as m
    from tec_fast.kernels._common import run_options

    fn = m._layer_norm_fwd_kernel
    x, w, b = torch.randn(10, 32), torch.randn(32), torch.randn(32)
    y, stats = torch.empty_like(x), torch.empty(2, 10)
    call = (x, x, w, b, y, y, stats, 10, 32, 1e-6, 32, 0)
    meta = dict(HAS_RES=False, HAS_STATS=True, BLOCK_C=32, num_warps=4)
    driver.set_active(_offline_driver(90))
    try:
        kernel = fn.run(*call, grid=(10,), warmup=True, **meta)  # compiles once
        kernel._run, kernel.module, kernel.function = (lambda *a: None), "not loaded", 0
        kernel_cache, key_cache, _, _, binder = fn.device_caches[driver.active.get_current_device()]
        options = run_options(meta, False)
        bound, spec, opts = binder(*call, **options)
        args_ = tuple(bound.values())
        parts = {
            "JITFunction.run (whole launch, driver call stubbed)":
                lambda: fn.run(*call, grid=(10,), warmup=False, **meta),
            "argument binder (specialisation)": lambda: binder(*call, **options),
            "cache key": lambda: compute_cache_key(key_cache, spec, opts),
            "launch metadata": lambda: kernel.launch_metadata((10,), 0, *args_),
            "compiled launcher call (stubbed)":
                lambda: kernel.run(10, 1, 1, 0, kernel.function, kernel.packed_metadata, None, None, None, *args_),
        }
        rows = [dict(part=name, us=best_us(f, args.calls)) for name, f in parts.items()]
    finally:
        driver.reset_active() if driver._default is not None else setattr(driver, "_active", None)
    rows.append(dict(part="rest of run (knobs, device, stream, hooks, globals, grid)",
                     us=rows[0]["us"] - sum(r["us"] for r in rows[1:])))
    print(format_table(rows, ["part", "us"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
