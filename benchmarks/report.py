"""Performance tables generated from ``benchmarks/results/*.jsonl`` (never typed by hand).

    python -m benchmarks.report                 # print the tables
    python -m benchmarks.report --update-readme # write them between the perf markers: the whole-step
                                                # table into README.md, every table into docs/performance.md
"""
from __future__ import annotations

import argparse
import glob
import os

from tec_fast.training.monitor import read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"


def load_rows(results_dir: str):
    return [row for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))) for row in read_jsonl(path)]


def _latest(rows, keys):
    """The newest row for each combination of ``keys`` (files are append-only)."""
    out = {}
    for r in sorted(rows, key=lambda r: r.get("timestamp", "")):
        out[tuple(r.get(k) for k in keys)] = r
    return list(out.values())


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _on_device(r) -> bool:
    """A row measured on a GPU (not a CPU smoke run, not a fake-tensor estimate)."""
    dev = str(r.get("device", "cpu")).lower()
    return "cpu" not in dev and "fake" not in dev and r.get("bench") not in ("traffic", "compile")


def tables(rows, steps_only: bool = False) -> str:
    """The tables of the GPU rows in ``rows``: whole step, profile, per op (only the first with
    ``steps_only``, as the README shows it)."""
    gpu = [dict(r, timing=r.get("timing") or "eager") for r in rows if _on_device(r)]
    if not gpu:
        return ("No GPU results yet: `benchmarks/run_device.sh` has not run on a lent H100/H200. "
                "CPU rows in `benchmarks/results/` are smoke runs, not performance figures.")
    lines = []
    steps = _latest([r for r in gpu if r.get("bench") == "step" and str(r.get("provider")).startswith("engine")],
                    ("device", "preset", "shape", "dtype", "compile", "provider"))
    steps.sort(key=lambda r: (r.get("device"), r.get("preset"), int(str(r.get("shape")).split(",")[0][2:] or 0),
                              r.get("provider")))
    if steps:
        lines += ["Whole training step (engine vs eager baseline in the same run; `engine_graph`: the same "
                  "step recorded once into a CUDA graph and replayed; `engine_fit_graph`: replayed as the "
                  "trainer does by default, one graph for forward + backward and one for the optimizer):", "",
                  "| device | model | shape | provider | dtype | img/s | baseline img/s | speedup | MFU | peak GB "
                  "| baseline peak GB | commit |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in steps:
            lines.append(f"| {r.get('device')} | {r.get('preset')} | {r.get('shape')} | {r.get('provider')} | "
                         f"{r.get('dtype')} | "
                         f"{_fmt(r.get('img_per_s'), '.0f')} | {_fmt(r.get('baseline_img_per_s'), '.0f')} | "
                         f"{_fmt(r.get('speedup'), '.2f')}x | {_fmt(r.get('mfu'), '.1%')} | "
                         f"{_fmt(r.get('peak_mem_gb'), '.1f')} | {_fmt(r.get('baseline_peak_mem_gb'), '.1f')} | "
                         f"{str(r.get('commit', ''))[:8]} |")
        lines.append("")
    if steps_only:
        return "\n".join(lines).strip() or "No whole-step rows measured on a GPU yet."
    prof = _latest([r for r in gpu if r.get("bench") == "profile_step"],
                   ("device", "preset", "batch", "provider", "kernels"))
    if prof:
        lines += ["Where the step's time goes (`benchmarks/profile_step.py`, torch.profiler; the profiler adds "
                  "host time, so wall times run above the unprofiled ones):", "",
                  "| device | model | batch | provider | kernels | wall ms/step | GPU busy ms | kernel launches | commit |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in prof:
            lines.append(f"| {r.get('device')} | {r.get('preset')} | {r.get('batch')} | {r.get('provider')} | "
                         f"{r.get('kernels', 'auto')}{' (shapes recorded)' if r.get('shapes_recorded') else ''} | "
                         f"{_fmt(r.get('wall_ms'), '.1f')} | "
                         f"{_fmt(r.get('gpu_busy_ms'), '.1f')} | "
                         f"{r.get('launches')} | {str(r.get('commit', ''))[:8]} |")
        lines.append("")
    ops = _latest([r for r in gpu if r.get("bench") not in ("step", "profile_step")],
                  ("device", "bench", "provider", "shape", "dtype", "timing"))
    if ops:
        lines += ["Per-op and packing benchmarks (timing `eager`: CUDA events around each eager call, so "
                  "host time counts where an op is shorter than its Python and launch work, as in the "
                  "fwdbwd rows; `graph`: the calls replayed from a CUDA graph, GPU time only):", "",
                  "| device | bench | provider | shape | dtype | timing | median ms | p20 | p80 | speedup | peak GB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in ops:
            lines.append(f"| {r.get('device')} | {r.get('bench')} | {r.get('provider')} | {r.get('shape')} | "
                         f"{r.get('dtype')} | {r['timing']} | {_fmt(r.get('median_ms'), '.3f')} | "
                         f"{_fmt(r.get('p20_ms'), '.3f')} | "
                         f"{_fmt(r.get('p80_ms'), '.3f')} | {_fmt(r.get('speedup'), '.2f')} | "
                         f"{_fmt(r.get('peak_mem_gb'), '.2f')} |")
    return "\n".join(lines)


def update_between_markers(text: str, readme: str) -> None:
    with open(readme) as f:
        content = f.read()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--update-readme", action="store_true",
                   help="write the whole-step table into --readme and every table into --doc")
    p.add_argument("--readme", default=os.path.join(os.path.dirname(HERE), "README.md"))
    p.add_argument("--doc", default=os.path.join(os.path.dirname(HERE), "docs", "performance.md"))
    args = p.parse_args(argv)
    rows = load_rows(args.results_dir)
    text = tables(rows)
    print(text)
    if args.update_readme:
        update_between_markers(tables(rows, steps_only=True), args.readme)
        update_between_markers(text, args.doc)


if __name__ == "__main__":
    main()
