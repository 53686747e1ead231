"""Performance tables generated from ``benchmarks/results/*.jsonl`` (never typed by hand).

    python -m benchmarks.report                 # print the tables
    python -m benchmarks.report --update-readme # write them between the markers: the whole-step table
                                                # and the host-cost table into README.md, every table
                                                # into docs/performance.md
"""
from __future__ import annotations

import argparse
import glob
import os

from benchmarks.common import make_parser
from tec_fast.cli.flags import existing_dir, existing_file
from tec_fast.training.monitor import read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
HOST_BEGIN, HOST_END = "<!-- host:begin -->", "<!-- host:end -->"


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
    """A benchmark row measured on a GPU (not a CPU smoke run, not a fake-tensor estimate, not a
    host-overhead row: those have tables of their own)."""
    dev = str(r.get("device", "cpu")).lower()
    return "cpu" not in dev and "fake" not in dev and r.get("bench") not in (None, "traffic", "compile")


def tables(rows, steps_only: bool = False, where: str = "benchmarks/results/") -> str:
    """The tables of the GPU rows in ``rows``: whole step, profile, per op (only the first with
    ``steps_only``, as the README shows it); ``where``: the folder the rows were read from, named
    when none of them is a GPU row."""
    gpu = [dict(r, timing=r.get("timing") or "eager") for r in rows if _on_device(r)]
    if not gpu:
        return ("No GPU results yet: `benchmarks/run_device.sh` has not run on a lent H100/H200. "
                f"CPU rows in `{where}` are smoke runs, not performance figures.")
    lines = []
    steps = _latest([r for r in gpu if r.get("bench") == "step" and str(r.get("provider")).startswith("engine")],
                    ("device", "preset", "shape", "dtype", "compile", "provider"))
    steps.sort(key=lambda r: (r.get("device"), r.get("preset"), int(str(r.get("shape")).split(",")[0][2:] or 0),
                              r.get("provider")))
    if steps:
        shown = {r.get("provider") for r in steps}
        modes = [text for name, text in (
            ("engine_graph", "`engine_graph`: the same step recorded once into a CUDA graph and replayed"),
            ("engine_fit_graph", "`engine_fit_graph`: replayed as the trainer does by default, one graph for "
                                 "forward + backward and one for the optimizer")) if name in shown]
        lines += ["Whole training step (engine vs eager baseline in the same run" + "".join(f"; {m}" for m in modes)
                  + "):", "",
                  "| device | model | shape | provider | dtype | img/s | baseline img/s | speedup | MFU | peak GB "
                  "| baseline peak GB | commit |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in steps:
            lines.append(f"| {r.get('device')} | {r.get('preset')} | {r.get('shape')} | {r.get('provider')} | "
                         f"{r.get('dtype')} | "
                         f"{_fmt(r.get('img_per_s'), '.0f')} | {_fmt(r.get('baseline_img_per_s'), '.0f')} | "
                         f"{_fmt(r.get('speedup'), '.2f')}x | {_fmt(r.get('mfu'), '.1%')} | "
                         f"{_fmt(r.get('peak_mem_gb'), '.1f')} | {_fmt(r.get('baseline_peak_mem_gb'), '.1f')} | "
                         f"{_commit(r)} |")
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
                         f"{r.get('launches')} | {_commit(r)} |")
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


def _host_runs(rows, launch_path: bool):
    """(commit, rows) of the newest commit's CPU runs of ``host_overhead.py`` with or without
    ``--launch-path``, the rows in file order (each run's in pairs: ours, then the reference);
    (None, []) where there are none."""
    host = [r for r in rows if r.get("table") in ("step", "op") and "cpu" in str(r.get("device", ""))
            and "threads" in r and bool(r.get("launch_path")) == launch_path
            and r.get("launch", "1") != "0"  # TEC_FAST_LAUNCH=0 runs are comparisons, not the engine's path
            and r.get("full_run", True)  # subsets and smoke runs left out (rows before the mark were full runs)
            and not str(r.get("commit", "")).endswith("-mixed")]  # code from another checkout than the commit's
    if not host:
        return None, []
    commit = max(host, key=lambda r: r.get("timestamp", ""))["commit"]
    return commit, [r for r in host if r["commit"] == commit]


def _machine(row) -> str:
    """'2-core CPU, one thread' from a row's device ('cpu-x86_64-2c') and thread count."""
    cores = str(row.get("device", "")).rsplit("-", 1)[-1]
    cpu = f"{cores[:-1]}-core CPU" if cores.endswith("c") and cores[:-1].isdigit() else str(row.get("device"))
    threads = row.get("threads")
    return f"{cpu}, {'one thread' if threads == 1 else f'{threads} threads'}"


def _commit(row) -> str:
    """The row's commit, a working tree with changes as '186429e (dirty)'."""
    commit = str(row.get("commit", ""))
    return f"{commit[:-len('-dirty')]} (dirty)" if commit.endswith("-dirty") else commit


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _host_cells(host):
    """Per row label: (ours, reference, ratios) over the runs in ``host``; the number of runs."""
    def pairs(selected, ours):
        return [r for r in selected if r["provider"] == ours], [r for r in selected if r["provider"] != ours]

    def total(r):
        return r["fwd_us"] + (r["bwd_us"] or 0.0)
    cells = {}
    eng, eag = pairs([r for r in host if r["table"] == "step"], "engine")
    if eng:
        cells["step"] = ([r["host_ms"] for r in eng], [r["host_ms"] for r in eag], [r["vs_eager"] for r in eng])
    ops = [r for r in host if r["table"] == "op"]
    for op in dict.fromkeys(r["op"] for r in ops):
        ours, ref = pairs([r for r in ops if r["op"] == op], "triton")
        cells[op] = ([total(r) for r in ours], [total(r) for r in ref], [r["fwdbwd_vs_reference"] for r in ours],
                     bool(ours[0].get("bwd_us")))
    return cells, max((len(v[0]) for v in cells.values()), default=0)


def host_table(rows) -> str:
    """The host-cost table of the newest commit's CPU runs of ``benchmarks/host_overhead.py``: per
    step and per op (forward + backward), the engine's and the reference's host time (median over
    the runs of each run's best repetition) and the range of their ratio over the runs; beside it,
    the newest ``--launch-path`` runs (Triton's own launch path timed too), where there are any."""
    commit, host = _host_runs(rows, launch_path=False)
    if not host:
        return "No host-cost rows yet: run `python -m benchmarks.host_overhead`."
    cells, runs = _host_cells(host)
    lp_commit, lp_host = _host_runs(rows, launch_path=True)
    lp_cells, lp_runs = _host_cells(lp_host) if lp_host else ({}, 0)

    def amount(values, unit):
        return f"{_median(values):.{1 if unit == 'ms' else 0}f} {unit}"

    def ratio(ratios):
        return f"{min(ratios):.2f}-{max(ratios):.2f}x"
    lines = [f"Host time with every kernel launch skipped (`python -m benchmarks.host_overhead`, "
             f"{_machine(host[0])}, commit {commit}, {runs} run{'s' if runs > 1 else ''}): what the Python, "
             "the dispatcher and autograd cost around the kernels, against plain torch in the same run."]
    if lp_cells:
        how = ("compiled kernels reused by call signature and their launchers called" if "launch" in lp_host[0]
               else "`JITFunction.run`")
        lines[0] += (f" The last two columns count the launch path too (`--launch-path`: {how}, up to the driver "
                     f"call, kernels compiled for sm_90 offline; commit {lp_commit}, "
                     f"{lp_runs} run{'s' if lp_runs > 1 else ''}).")
    head = "| per call | engine | plain torch | ratio | goal |"
    rule = "| --- | ---: | ---: | ---: | --- |"
    if lp_cells:
        head = head[:-len(" goal |")] + " engine, launch path | ratio, launch path | goal |"
        rule = rule[:-len(" --- |")] + " ---: | ---: | --- |"
    lines += ["", head, rule]
    for key, (ours, ref, ratios, *grad) in cells.items():
        unit = "ms" if key == "step" else "us"
        if key == "step":
            label, goal = "ViT-B TEC step (base fwd, fwd + bwd), widths shrunk", "<= 0.5x"
        else:
            label, goal = (f"`{key}` fwd + bwd" if grad[0] else f"`{key}` fwd (no gradient)"), "<= 1.5x"
        row = f"| {label} | {amount(ours, unit)} | {amount(ref, unit)} | {ratio(ratios)} |"
        if lp_cells:
            lp = lp_cells.get(key)
            row += f" {amount(lp[0], unit)} | {ratio(lp[2])} |" if lp else " - | - |"
        lines.append(row + f" {goal} |")
    return "\n".join(lines)


def update_between_markers(text: str, readme: str, begin: str = BEGIN, end: str = END) -> None:
    with open(readme) as f:
        content = f.read()
    if begin not in content or end not in content:
        raise SystemExit(f"{readme} has no {begin} ... {end} markers")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")


def _shown(folder: str) -> str:
    """``folder`` as the tables name it: relative to the checkout where it is inside it."""
    path = os.path.abspath(folder)
    rel = os.path.relpath(path, os.path.dirname(HERE))
    return (path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel).rstrip(os.sep) + "/"


def main(argv=None):
    p = make_parser("report", __doc__)
    p.add_argument("--results-dir", type=existing_dir, default=os.path.join(HERE, "results"),
                   help="folder whose *.jsonl result files the tables are made from (default benchmarks/results)")
    p.add_argument("--update-readme", action="store_true",
                   help="write the whole-step and host-cost tables into --readme and every table into --doc")
    p.add_argument("--readme", default=os.path.join(os.path.dirname(HERE), "README.md"),
                   help=f"with --update-readme: the file whose {BEGIN} ... {END} and {HOST_BEGIN} ... {HOST_END} "
                        "markers get the whole-step and host-cost tables (default README.md of this checkout)")
    p.add_argument("--doc", default=os.path.join(os.path.dirname(HERE), "docs", "performance.md"),
                   help="with --update-readme: the file whose same markers get every table and the host-cost "
                        "table (default docs/performance.md of this checkout)")
    args = p.parse_args(argv)
    if args.update_readme:  # checked before anything is written: a half-updated pair is refused up front
        for flag, path in (("--readme", args.readme), ("--doc", args.doc)):
            try:
                existing_file(path)
            except argparse.ArgumentTypeError as exc:
                p.refuse(flag, str(exc))
            with open(path) as f:
                content = f.read()
            missing = [f"{b} ... {e}" for b, e in ((BEGIN, END), (HOST_BEGIN, HOST_END))
                       if b not in content or e not in content]
            if missing:
                p.refuse(flag, f"{path} has no {' or '.join(missing)} markers")
    rows = load_rows(args.results_dir)
    where = _shown(args.results_dir)
    text, host = tables(rows, where=where), host_table(rows)
    print(text + "\n\n" + host)
    if args.update_readme:
        update_between_markers(tables(rows, steps_only=True, where=where), args.readme)
        update_between_markers(text, args.doc)
        for path in (args.readme, args.doc):
            update_between_markers(host, path, HOST_BEGIN, HOST_END)


if __name__ == "__main__":
    main()
