"""Host cost of the engine's op calls and of its TEC step, measured without a GPU.

Why: on a GPU a training step is only as fast as the host can issue its kernels. This tool makes
every kernel free and times what is left: the Python of each op (checks, dispatch, allocations,
launch set-up), the torch dispatcher and autograd. On CPU every Triton launch is recorded and
skipped (``benchmarks/triton_stub.py``); torch's own CPU kernels run on tensors so small that
their compute is negligible, one thread. Two tables:

* the step: ViT-B/16's TEC step (base forward, new-model forward and backward; no optimizer)
  with ViT-B's depth, heads, decoder and op count but widths shrunk (encoder 48 wide, 12 heads
  of 4; decoder 32 wide; 64 px images = 16 patches; batch 2; fp32), the engine with
  ``TEC_FAST_KERNELS=triton`` against the eager baseline (``benchmarks/baseline_eager.py``) in the
  same run: host ms per step, Triton launches and top-level torch (aten) ops per step;
* every op of the registry (``tec_fast.ops.registry.OPS``, its ``tiny`` example): host us per
  forward call and per backward call of the public op (``tec_fast.ops.<op>``, Triton path)
  against the op's plain-torch reference (``tec_fast.ops.reference.<op>``) on the same inputs,
  and Triton launches per call.

With ``--launch-path`` (CPU) Triton's own launch path is timed too: the interpreter stays off,
each kernel is compiled once for sm_90 through an offline target, and every launch runs
``JITFunction.run`` (argument binding and specialisation, the cache lookup, the launcher call)
up to the driver call, which alone is skipped (``triton_stub.driver_calls_stubbed``). That is
the part of a launch's host cost the default stub leaves out; the driver's own
``cuLaunchKernel`` stays unmeasured.

On CUDA the launches are real: the step table adds wall time and GPU-busy time per step (from
``torch.profiler``), and per-op host time is the time to issue calls without synchronising.
Rows are appended to ``benchmarks/results/host_overhead.jsonl`` (device, commit, versions).

    python -m benchmarks.host_overhead                 # both tables
    python -m benchmarks.host_overhead --skip-step --reps 5
    python -m benchmarks.host_overhead --launch-path   # Triton's launch path timed as well
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from typing import Callable, Dict, List, Optional

# The Triton path on CPU tensors needs the interpreter switched on before any kernel is defined
# (no kernel actually runs here: every launch is skipped); --launch-path needs it off (compiled
# kernels, launched through Triton's own path up to the driver).
if __name__ == "__main__":
    _cuda = "--device=cuda" in sys.argv or any(a == "--device" and b == "cuda" for a, b in zip(sys.argv, sys.argv[1:]))
    os.environ.setdefault("TRITON_INTERPRET", "0" if _cuda or "--launch-path" in sys.argv else "1")
    os.environ["TEC_FAST_KERNELS"] = "triton"

import torch  # noqa: E402

from benchmarks.common import (REPO, append_jsonl, complete_row, format_table, make_parser,  # noqa: E402
                               optional_results_file, quiet_profile)
from tec_fast.cli.flags import POSITIVE  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "host_overhead.jsonl")
DEFAULT_STEPS, DEFAULT_CALLS, DEFAULT_REPS = 3, 50, 7


class LaunchLog:
    """Counts skipped (CPU) Triton launches by kernel name."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, name, args, kwargs) -> None:
        self.counts[name] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def denormals_flushed(device: torch.device):
    """CPU: denormal floats read as zero within the block (``torch.set_flush_denormal``; off again
    after, torch's default). The skipped kernels leave their outputs as ``torch.empty`` gave them,
    and recycled memory read as floats is often denormal (small integers' bit patterns), on which
    the CPU's GEMMs take a slow path (a [10, 128] x [128, 32] mm: 92 us on denormal input against
    1.6 us, one thread here). Only the engine's tensors hold such garbage, so without this its
    host time would count arithmetic on garbage that eager's step never meets."""
    flushed = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _kernels_off(device: torch.device, log: LaunchLog, launch_path: bool = False):
    """CPU: Triton launches recorded and skipped (with ``launch_path``, only their driver call);
    CUDA: real launches (not counted)."""
    if device.type == "cuda":
        return contextlib.nullcontext()
    from benchmarks.triton_stub import driver_calls_stubbed, launches_stubbed
    return driver_calls_stubbed(log) if launch_path else launches_stubbed(log)


def torch_ops(fn: Callable[[], object]) -> Counter:
    """The top-level aten ops one call of ``fn`` issues, by name (ops that other aten ops call
    inside, e.g. linear's addmm, not counted), from ``torch.profiler``: the dispatcher round trips
    a call costs the host, a count that does not depend on how busy the machine is. Ops the
    autograd engine runs in backward count too."""
    from torch.profiler import ProfilerActivity
    with quiet_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fns: Dict[str, Callable[[], object]], calls: int, reps: int,
                  device: torch.device) -> Dict[str, Dict[str, float]]:
    """The microseconds per call of ``calls`` back-to-back calls of each of ``fns``, the
    providers interleaved rep by rep: {"min": best of ``reps``, "median": their median}. On CPU
    the clock is this thread's CPU time (``time.thread_time``), so time spent descheduled on a
    shared machine does not count; on a GPU it is wall time without synchronising between calls
    (the host's issue time while the tiny kernels keep up). The best repetition is the number
    reported: on a shared virtual machine other guests' load only ever adds time (it shows up as
    CPU time the guest cannot tell from its own), so the minimum is the stable estimate of what
    a call costs; the median shows how much the load moved it."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    _sync(device)
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(calls):
                fn()
            _sync(device)
            samples[name].append((clock() - t0) * 1e6 / calls)
    return {name: {"min": min(v), "median": sorted(v)[len(v) // 2]} for name, v in samples.items()}


# ---- the step --------------------------------------------------------------------------------

def step_configs():
    """ViT-B/16's TEC step with its depth, heads, decoder and top-k, widths shrunk."""
    from tec_fast import TECConfig, ViTConfig
    vit = ViTConfig(img_size=64, patch_size=16, embed_dim=48, depth=12, num_heads=12)
    cfg = TECConfig(encoder=vit, decoder_dim=32, decoder_depth=2, decoder_heads=16, tau=1.8,
                    pred_dim=48, pred_heads=12)
    return vit, cfg, 15


def step_parts(provider: str, device: torch.device, batch: int = 2):
    """(frozen base, new model, images, the new model's trainable parameters) of ``provider``'s
    step: engine or eager."""
    from benchmarks.baseline_eager import EagerBase, EagerTEC
    from tec_fast import BaseModel, TECModel
    vit, cfg, topk = step_configs()
    torch.manual_seed(0)
    if provider == "engine":
        base, model = BaseModel(vit, topk=topk), TECModel(cfg)
    elif provider == "eager":
        base, model = EagerBase(vit, topk=topk), EagerTEC(cfg)
    else:
        raise ValueError(f"provider must be 'engine' or 'eager', got {provider!r}")
    base, model = base.to(device).eval(), model.to(device)
    images = torch.randn(batch, 3, vit.img_size, vit.img_size, device=device)
    return base, model, images, [p for p in model.parameters() if p.requires_grad]


def make_step(provider: str, device: torch.device, batch: int = 2) -> Callable[[], None]:
    """One step (base forward, new-model forward, backward) of ``provider``: engine or eager."""
    base, model, images, params = step_parts(provider, device, batch)

    def step():
        for p in params:
            p.grad = None
        with torch.no_grad():
            targets = base(images)
        model(images, targets, mask_ratio=0.75)["loss"].backward()
    return step


def measure_steps(device: torch.device, steps: int, reps: int, launch_path: bool = False) -> List[Dict]:
    """The engine's and the eager step's host ms per step, timed interleaved."""
    fns = {p: make_step(p, device) for p in ("engine", "eager")}
    launches, op_counts = {}, {}
    for provider, step in fns.items():
        log = LaunchLog()
        with _kernels_off(device, log, launch_path):
            step()
            log.counts.clear()
            step()
            launches[provider] = log.total if device.type != "cuda" else None
            op_counts[provider] = sum(torch_ops(step).values())
    log = LaunchLog()
    with _kernels_off(device, log, launch_path):
        us = time_per_call(fns, steps, reps, device)
    rows = [dict(table="step", provider=p, host_ms=us[p]["min"] / 1e3, host_ms_median=us[p]["median"] / 1e3,
                 triton_launches=launches[p], torch_ops=op_counts[p], vs_eager=us[p]["min"] / us["eager"]["min"])
            for p in fns]
    if device.type == "cuda":
        from benchmarks.profile_step import profile_step
        for row, step in zip(rows, fns.values()):
            summary = profile_step(step, device, warmup=2, steps=steps, top=1)[0]
            row.update(wall_ms=summary["wall_ms"], gpu_busy_ms=summary["gpu_busy_ms"],
                       gpu_launches=summary["launches"])
    return rows


# ---- the ops ---------------------------------------------------------------------------------

def _backward_fn(out, leaves):
    from tec_fast.ops.registry import outputs, unit_grads
    outs = outputs(out)
    grads = unit_grads(outs)
    return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True)


def measure_op(name: str, device: torch.device, calls: int, reps: int, size: str = "tiny",
               launch_path: bool = False) -> List[Dict]:
    """Host us per forward and per backward call of ``tec_fast.ops.<name>`` (Triton path) and of
    its reference, on the registry's example inputs; Triton launches per call."""
    from tec_fast import ops
    from tec_fast.ops import reference
    from tec_fast.ops.registry import OPS, SIZES
    spec = OPS[name]
    torch.manual_seed(0)
    ex = spec.example(SIZES[size], torch.float32, device)
    impls = {"triton": getattr(ops, name), "reference": getattr(reference, name)}
    calls_fwd = {p: (lambda fn=fn: fn(*ex.args, **ex.kwargs)) for p, fn in impls.items()}
    rows = []
    log = LaunchLog()
    with _kernels_off(device, log, launch_path):
        launches, calls_bwd = {}, {}
        for p, call in calls_fwd.items():
            log.counts.clear()
            out = call()
            launches[p] = [log.total, None]
            if ex.grad_of:
                calls_bwd[p] = _backward_fn(out, ex.grad_of)
                log.counts.clear()
                calls_bwd[p]()
                launches[p][1] = log.total
        fwd_us = time_per_call(calls_fwd, calls, reps, device)
        bwd_us = time_per_call(calls_bwd, calls, reps, device) if calls_bwd else {}
    counted = device.type != "cuda"
    for p in impls:
        bwd = bwd_us.get(p, {})
        rows.append(dict(table="op", op=name, provider=p, shape=ex.shape, fwd_us=fwd_us[p]["min"],
                         bwd_us=bwd.get("min"), fwd_us_median=fwd_us[p]["median"], bwd_us_median=bwd.get("median"),
                         fwd_launches=launches[p][0] if counted else None,
                         bwd_launches=launches[p][1] if counted else None))
    ref = rows[1]
    for r in rows:  # host time per call against the reference's: forward, backward, both
        r["fwd_vs_reference"] = r["fwd_us"] / ref["fwd_us"]
        r["bwd_vs_reference"] = r["bwd_us"] / ref["bwd_us"] if r["bwd_us"] else None
        r["fwdbwd_vs_reference"] = ((r["fwd_us"] + r["bwd_us"]) / (ref["fwd_us"] + ref["bwd_us"])
                                    if r["bwd_us"] else r["fwd_vs_reference"])
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    from tec_fast.ops.registry import OPS
    parts = __doc__.split("\n\n", 3)  # the summary, why, the two tables; then the epilog
    p = make_parser("host_overhead", "\n\n".join(parts[:3]), epilog=parts[3])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: Triton launches skipped (default); cuda: real launches, plus GPU-busy time")
    p.add_argument("--ops", default="all", help=f"comma-separated subset of {','.join(OPS)}, or all")
    p.add_argument("--skip-step", action="store_true", help="only the per-op table")
    p.add_argument("--skip-ops", action="store_true", help="only the step table")
    p.add_argument("--steps", type=POSITIVE, default=DEFAULT_STEPS,
                   help="steps per timed repetition (default %(default)s)")
    p.add_argument("--calls", type=POSITIVE, default=DEFAULT_CALLS,
                   help="op calls per timed repetition (default %(default)s)")
    p.add_argument("--reps", type=POSITIVE, default=DEFAULT_REPS,
                   help="timed repetitions, interleaved; the best is reported, the median kept beside it "
                        "(default %(default)s). Rows of a run with fewer, or with --ops / --skip-*, are marked "
                        "full_run=false, and the README's table leaves them out")
    p.add_argument("--threads", type=POSITIVE, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--launch-path", action="store_true",
                   help="CPU: time Triton's own launch path as well (kernels compiled once for sm_90 offline; "
                        "only the driver call is skipped)")
    p.add_argument("--out", default=RESULTS, type=optional_results_file,
                   help="JSON-lines file rows are appended to ('' = none; default "
                        "benchmarks/results/host_overhead.jsonl)")
    args = p.parse_args(argv)
    ops = list(OPS) if args.ops == "all" else [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        p.refuse("--ops", f"unknown {bad}; choose from {list(OPS)}")
    if not ops and not args.skip_ops:
        p.refuse("--ops", f"no op named in {args.ops!r}; choose from {list(OPS)}, or all")
    if args.skip_step and args.skip_ops:
        p.error("--skip-step with --skip-ops leaves nothing to measure")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.refuse("--device", "cuda: no CUDA device here")
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.launch_path and (device.type == "cuda" or interpret):
        p.error("--launch-path is for --device cpu with TRITON_INTERPRET unset before Triton is imported "
                "(run it as python -m benchmarks.host_overhead --launch-path, which leaves it unset)")
    if device.type == "cpu" and not args.launch_path and not interpret:
        p.error("--device cpu needs TRITON_INTERPRET=1 set before Triton is imported (run it as "
                "python -m benchmarks.host_overhead, which sets it)")
    torch.set_num_threads(args.threads)
    from tec_fast.ops import dispatch
    dispatch.set_kernel_mode("triton")  # every op's Triton path, wherever auto would not take it
    if args.launch_path:  # CPU tensors take the Triton path, as under the interpreter
        dispatch._SETTINGS["interpret"] = True
    stamp = None
    if args.out:
        # full_run: both tables, every op, at least the default repetitions (what the README's
        # table is made of: benchmarks/report.py leaves subsets and smoke runs out)
        full = (args.ops == "all" and not args.skip_step and not args.skip_ops and args.reps >= DEFAULT_REPS
                and args.steps >= DEFAULT_STEPS and args.calls >= DEFAULT_CALLS)
        stamp = dict(threads=args.threads, kernel_mode="triton", launch_path=args.launch_path, reps=args.reps,
                     steps=args.steps, calls=args.calls, full_run=full)
        if args.launch_path:
            from tec_fast.kernels._common import launch_mode
            stamp["launch"] = launch_mode()  # 1: compiled kernels reused by call signature; 0: JITFunction.run

    def write(rows: List[Dict]) -> None:  # as they are measured: a run cut short keeps them
        if stamp is not None:
            append_jsonl([complete_row(dict(r, **stamp), device) for r in rows], args.out)

    try:
        with denormals_flushed(device):
            rows = _run(args, ops, device, write)
    finally:
        dispatch.reload_environment()  # the process's own setting again
    if args.out:
        print(f"appended {len(rows)} rows to {args.out}")
    return 0


def _run(args, ops: List[str], device: torch.device, write) -> List[Dict]:
    rows: List[Dict] = []
    if not args.skip_step:
        print("step: engine and eager, interleaved ...", file=sys.stderr, flush=True)
        rows += measure_steps(device, args.steps, args.reps, args.launch_path)
        write(rows)
        print(format_table(rows, ["provider", "host_ms", "vs_eager", "triton_launches", "torch_ops", "wall_ms",
                                  "gpu_busy_ms", "gpu_launches"]))
    if not args.skip_ops:
        op_rows = []
        for i, name in enumerate(ops):
            print(f"op {i + 1}/{len(ops)}: {name} ...", file=sys.stderr, flush=True)
            op_rows += (measured := measure_op(name, device, args.calls, args.reps, launch_path=args.launch_path))
            write(measured)
        print(format_table(op_rows, ["op", "provider", "shape", "fwd_us", "bwd_us", "fwd_vs_reference",
                                     "bwd_vs_reference", "fwdbwd_vs_reference", "fwd_launches", "bwd_launches"]))
        rows += op_rows
    return rows


if __name__ == "__main__":
    sys.exit(main())
