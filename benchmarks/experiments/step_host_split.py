"""Where the host time of the CPU step in ``benchmarks/host_overhead.py`` goes, engine against
eager: torch.profiler's self CPU time per step, split into torch's own compute kernels (GEMMs,
attention, convolution: the same math in both, run for real on the CPU's tiny tensors; the
engine's fused attention kernel, eager's bmm / softmax / bmm), the
autograd engine's gradient accumulation into the parameters, and everything else (Python, the
dispatcher, allocations, views, the ops' wrappers, the skipped Triton launches).

Why: the step goal of ``host_overhead.py`` (engine <= 0.5x eager) compares two steps that run the
same GEMMs and attention. On this CPU those kernels are not free even at these sizes, so their
time bounds how far below eager any implementation that calls them can go. Times are under the profiler (which adds a little per
op): read the shares, not the milliseconds.

    python -m benchmarks.experiments.step_host_split            # 5 profiled steps each
    python -m benchmarks.experiments.step_host_split --phases   # wall time per phase instead

``--phases`` times the step's parts without the profiler (best of ``--steps`` x 10 steps,
interleaved): clearing the gradients, the frozen base's forward (no grad), the new model's
forward, and its backward, for the engine and for eager.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["TEC_FAST_KERNELS"] = "triton"

import torch  # noqa: E402

from tec_fast.cli.flags import POSITIVE  # noqa: E402

KERNELS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
           "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
           "aten::_softmax", "aten::_softmax_backward_data")  # eager's attention: bmm, softmax, bmm
ACCUMULATE = ("torch::autograd::AccumulateGrad", "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad")


def split(step, steps: int):
    """(ms per step of profiled self CPU time: total, compute kernels, gradient accumulation)."""
    from torch.profiler import ProfilerActivity

    from benchmarks.common import quiet_profile
    step()
    with quiet_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    total = kern = acc = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        if e.key in KERNELS:
            kern += e.self_cpu_time_total
        elif e.key in ACCUMULATE:
            acc += e.self_cpu_time_total
    return total / steps / 1e3, kern / steps / 1e3, acc / steps / 1e3


PHASES = ("zero_grad", "base_forward", "forward", "backward")


def phase_times(providers, reps: int, steps: int = 10):
    """{provider: {phase: best ms}} of the step's parts, timed with perf_counter, interleaved."""
    import time
    from benchmarks.host_overhead import step_parts
    parts = {p: step_parts(p, torch.device("cpu")) for p in providers}
    best = {p: dict.fromkeys(PHASES, float("inf")) for p in providers}

    def run(provider, n):
        base, model, images, params = parts[provider]
        sums = dict.fromkeys(PHASES, 0.0)
        for _ in range(n):
            t0 = time.perf_counter()
            for p in params:
                p.grad = None
            t1 = time.perf_counter()
            with torch.no_grad():
                targets = base(images)
            t2 = time.perf_counter()
            loss = model(images, targets, mask_ratio=0.75)["loss"]
            t3 = time.perf_counter()
            loss.backward()
            t4 = time.perf_counter()
            for k, a, b in zip(PHASES, (t0, t1, t2, t3), (t1, t2, t3, t4)):
                sums[k] += b - a
        return {k: v / n * 1e3 for k, v in sums.items()}

    for provider in providers:
        run(provider, 2)  # warm-up
    for _ in range(reps):
        for provider in providers:
            for k, v in run(provider, steps).items():
                best[provider][k] = min(best[provider][k], v)
    return best


def main(argv=None) -> int:
    from benchmarks.common import make_parser
    p = make_parser("experiments.step_host_split", __doc__)
    p.add_argument("--steps", type=POSITIVE, default=5, metavar="N",
                   help="profiled steps per provider (default 5); with --phases, timed repetitions of 10 steps each")
    p.add_argument("--phases", action="store_true", help="wall ms per phase of the step (no profiler)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.common import format_table
    from benchmarks.host_overhead import LaunchLog, _kernels_off, denormals_flushed, make_step
    from tec_fast.ops import dispatch
    dispatch.set_kernel_mode("triton")
    dev = torch.device("cpu")
    rows = []
    if args.phases:
        try:
            with _kernels_off(dev, LaunchLog()), denormals_flushed(dev):
                best = phase_times(("engine", "eager"), args.steps)
        finally:
            dispatch.reload_environment()
        for provider, ms in best.items():
            rows.append(dict(provider=provider, **ms, total_ms=sum(ms.values())))
        for r in rows:
            r["vs_eager_total"] = r["total_ms"] / rows[1]["total_ms"]
        print(format_table(rows, ["provider", *PHASES, "total_ms", "vs_eager_total"]))
        return 0
    try:
        with _kernels_off(dev, LaunchLog()), denormals_flushed(dev):
            for provider in ("engine", "eager"):
                total, kern, acc = split(make_step(provider, dev), args.steps)
                rows.append(dict(provider=provider, profiled_ms=total, compute_kernels_ms=kern,
                                 grad_accumulation_ms=acc, rest_ms=total - kern - acc))
    finally:
        dispatch.reload_environment()  # the process's own TEC_FAST_KERNELS again
    eager = rows[1]["profiled_ms"]
    for r in rows:
        r["vs_eager_total"] = r["profiled_ms"] / eager
        r["compute_kernels_vs_eager_total"] = r["compute_kernels_ms"] / eager
    print(format_table(rows, ["provider", "profiled_ms", "compute_kernels_ms", "grad_accumulation_ms", "rest_ms",
                              "vs_eager_total", "compute_kernels_vs_eager_total"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
