"""Where one training step's time goes: torch.profiler over a few engine (and baseline) steps.

For each provider it prints the step's wall time (synchronised), the GPU busy time (the sum of
the kernels' durations), the number of kernel launches, and the ops with the most host (CPU)
time and the most device time per step. A step whose wall time is well above its GPU busy time
is bound by the host: Python, dispatch and launch overhead, or a host synchronisation.

    python -m benchmarks.profile_step --preset vit_base --batch 64
    python -m benchmarks.profile_step --device cpu --batch 4 --no-baseline   # host side only

Rows (one per provider) are appended to ``<results-dir>/profile.jsonl``; ``--trace DIR`` also
writes a Chrome trace per provider (open it in chrome://tracing or Perfetto).
"""
from __future__ import annotations

import os
import time

import torch
from torch.profiler import ProfilerActivity

from benchmarks.bench_step import PRESETS, baseline_step_fn, build, engine_step_fn
from benchmarks.common import (DTYPES, _sync, append_jsonl, complete_row, default_device, device_arg, device_name,
                               format_table, make_parser, optional_results_dir, progress, quiet_profile,
                               refuse_no_visible_patch, results_dir)
from tec_fast.cli.flags import NON_NEGATIVE, POSITIVE, real
from tec_fast.ops.dispatch import kernel_mode


def profile_step(step, device: torch.device, warmup: int, steps: int, top: int, trace: str = "",
                 shapes: bool = False):
    """Profile ``steps`` calls of ``step`` after ``warmup``; returns (summary dict, host table,
    device table, device table by input shapes: empty unless ``shapes``)."""
    for _ in range(warmup):
        step()
    _sync(device)()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_profile(activities=activities, record_shapes=shapes) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / steps  # device_time is in microseconds
    summary = dict(wall_ms=round(wall_ms, 3), gpu_busy_ms=round(gpu_ms, 3),
                   launches=round(len(kernels) / steps), host_bound=gpu_ms < 0.8 * wall_ms)

    def per_step(us):
        return round(us / 1e3 / steps, 3)

    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    host_rows = [dict(op=e.key[:60], calls=e.count // steps, self_cpu_ms=per_step(e.self_cpu_time_total),
                      cpu_ms=per_step(e.cpu_time_total)) for e in host]
    dev = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:top]
    dev_rows = [dict(op=e.key[:60], calls=e.count // steps, self_gpu_ms=per_step(e.self_device_time_total))
                for e in dev if getattr(e, "self_device_time_total", 0) > 0]
    shape_rows = []
    if shapes:  # which copy_, cat, sum ... calls cost the time: one row per (op, input shapes)
        by_shape = sorted(prof.key_averages(group_by_input_shape=True),
                          key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:top]
        shape_rows = [dict(op=e.key[:40], shapes=str(e.input_shapes)[:90], calls=e.count // steps,
                           self_gpu_ms=per_step(e.self_device_time_total))
                      for e in by_shape if getattr(e, "self_device_time_total", 0) > 0]
    return summary, host_rows, dev_rows, shape_rows


def python_profile(step, device: torch.device, steps: int, top: int):
    """cProfile over ``steps`` more calls, backward included (run on this thread): the Python
    functions with the most own time per step."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    # backward on this thread: autograd otherwise runs it on a device thread cProfile does not see
    with torch.autograd.set_multithreading_enabled(False):
        prof.enable()
        for _ in range(steps):
            step()
        _sync(device)()
        prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cum s, callers)
    rows = []
    for (path, line, func), (_, calls, own, cum, _) in stats.items():
        folder, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
        where = func if path == "~" else f"{folder}/{name}:{line}:{func}"
        rows.append(dict(function=where[-70:], calls=calls // steps, own_ms=round(own * 1e3 / steps, 3),
                         cum_ms=round(cum * 1e3 / steps, 3)))
    return sorted(rows, key=lambda r: r["own_ms"], reverse=True)[:top]


def main(argv=None):
    p = make_parser("profile_step", __doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="vit_base",
                   help="model size, bench_step's PRESETS (default vit_base: ViT-B/16 at 224; "
                        "tiny: 32 px, 64 patches, for a CPU)")
    p.add_argument("--device", type=device_arg, default=default_device(),
                   help="cpu, cuda or cuda:N (default: cuda where there is one, else cpu)")
    p.add_argument("--batch", type=POSITIVE, default=None, help="images per step (default 64 on GPU, 4 on CPU)")
    p.add_argument("--precision", choices=sorted(DTYPES), default="bf16",
                   help="the engine's autocast dtype, fp32 = no autocast (default bf16; the baseline runs "
                        "fp16 autocast on GPU, bf16 on CPU)")
    p.add_argument("--mask-ratio", type=real(0, 1, lo_open=True, hi_open=True), default=0.75,
                   help="share of the patches hidden from the encoder, in (0, 1) (default 0.75)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=3, help="steps before profiling (compiles the kernels)")
    p.add_argument("--steps", type=POSITIVE, default=3, help="profiled steps")
    p.add_argument("--top", type=POSITIVE, default=25, help="ops listed per table")
    p.add_argument("--no-baseline", action="store_true", help="profile the engine only")
    p.add_argument("--python", action="store_true",
                   help="also run cProfile over the same steps and list the Python functions with the "
                        "most own time (where host overhead outside aten ops goes)")
    p.add_argument("--shapes", action="store_true",
                   help="also record input shapes and list device time per (op, input shapes): which "
                        "copies, cats and sums cost the time (adds host overhead: read wall times "
                        "from a run without it)")
    p.add_argument("--trace", default="", type=optional_results_dir,
                   help="folder for Chrome traces, one per provider (made if missing; default: no traces)")
    p.add_argument("--results-dir", type=results_dir,
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder the rows are appended to, as profile.jsonl (made if missing; "
                        "default benchmarks/results)")
    args = p.parse_args(argv)

    refuse_no_visible_patch(p, "--mask-ratio", args.mask_ratio, PRESETS[args.preset][1].num_patches,
                            f"preset {args.preset}")
    device = torch.device(args.device)
    bvit, cfg, topk = build(args.preset, device)
    B = args.batch if args.batch is not None else (64 if device.type == "cuda" else 4)
    images = torch.randn(B, 3, bvit.img_size, bvit.img_size, device=device)
    providers = [("engine", lambda: engine_step_fn(bvit, cfg, topk, images, args.precision, False,
                                                   args.mask_ratio))]
    if not args.no_baseline:
        providers.append(("baseline", lambda: baseline_step_fn(bvit, cfg, topk, images, args.mask_ratio)))
    rows = []
    for i, (name, make) in enumerate(providers):
        progress(i + 1, len(providers), f"{name}: warm-up and {args.steps} profiled step(s)")
        step = make()
        trace = os.path.join(args.trace, f"trace_{name}_B{B}.json") if args.trace else ""
        if trace:
            os.makedirs(args.trace, exist_ok=True)
        summary, host_rows, dev_rows, shape_rows = profile_step(step, device, args.warmup, args.steps, args.top,
                                                                trace, args.shapes)
        py_rows = python_profile(step, device, args.steps, args.top) if args.python else []
        print(f"\n== {name}, {args.preset}, batch {B}, {args.precision}, kernels {kernel_mode()}, "
              f"{device_name(device)}: "
              f"wall {summary['wall_ms']:.2f} ms/step, GPU busy {summary['gpu_busy_ms']:.2f} ms, "
              f"{summary['launches']} kernel launches"
              + (" -> host-bound" if summary["host_bound"] and device.type == "cuda" else ""))
        print(f"-- most host time per step ({name})")
        print(format_table(host_rows, ["op", "calls", "self_cpu_ms", "cpu_ms"]))
        if dev_rows:
            print(f"-- most device time per step ({name})")
            print(format_table(dev_rows, ["op", "calls", "self_gpu_ms"]))
        if shape_rows:
            print(f"-- most device time per step by input shapes ({name})")
            print(format_table(shape_rows, ["op", "shapes", "calls", "self_gpu_ms"]))
        if py_rows:
            print(f"-- Python functions with the most own time per step ({name}, cProfile)")
            print(format_table(py_rows, ["function", "calls", "own_ms", "cum_ms"]))
        rows.append(complete_row(dict(bench="profile_step", provider=name, preset=args.preset, batch=B,
                                      precision=args.precision, kernels=kernel_mode(), **summary,
                                      top_host=host_rows[:10],
                                      shapes_recorded=args.shapes, top_device=dev_rows[:25],
                                      top_device_shapes=shape_rows[:25], top_python=py_rows[:10]), device))
        path = append_jsonl(rows[-1:], os.path.join(args.results_dir, "profile.jsonl"))  # each as it is made
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nrows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
