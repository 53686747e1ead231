"""Performance tables generated from ``benchmarks/results/*.jsonl`` (never typed by hand).

    python benchmarks/report.py                 # print the tables
    python benchmarks/report.py --update-readme # rewrite README.md between the perf markers
"""
from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"


def load_rows(results_dir: str):
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    return rows


def _latest(rows, keys):
    """The newest row for each combination of ``keys`` (files are append-only)."""
    out = {}
    for r in sorted(rows, key=lambda r: r.get("timestamp", "")):
        out[tuple(r.get(k) for k in keys)] = r
    return list(out.values())


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def tables(rows) -> str:
    gpu = [r for r in rows if "cpu" not in str(r.get("device", "cpu")).lower()]
    if not gpu:
        return ("No GPU results yet: `benchmarks/run_device.sh` has not run on a lent H100/H200. "
                "CPU rows in `benchmarks/results/` are smoke runs, not performance figures.")
    lines = []
    steps = _latest([r for r in gpu if r.get("bench") == "step" and r.get("provider") == "engine"],
                    ("device", "preset", "shape", "dtype", "compile"))
    if steps:
        lines += ["Whole training step (engine vs eager baseline in the same run):", "",
                  "| device | model | shape | dtype | img/s | baseline img/s | speedup | MFU | peak GB | baseline peak GB | commit |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in steps:
            lines.append(f"| {r.get('device')} | {r.get('preset')} | {r.get('shape')} | {r.get('dtype')} | "
                         f"{_fmt(r.get('img_per_s'), '.0f')} | {_fmt(r.get('baseline_img_per_s'), '.0f')} | "
                         f"{_fmt(r.get('speedup'), '.2f')}x | {_fmt(r.get('mfu'), '.1%')} | "
                         f"{_fmt(r.get('peak_mem_gb'), '.1f')} | {_fmt(r.get('baseline_peak_mem_gb'), '.1f')} | "
                         f"{str(r.get('commit', ''))[:8]} |")
        lines.append("")
    ops = _latest([r for r in gpu if r.get("bench") not in ("step",)],
                  ("device", "bench", "provider", "shape", "dtype"))
    if ops:
        lines += ["Per-op and packing benchmarks:", "",
                  "| device | bench | provider | shape | dtype | median ms | p20 | p80 | speedup | peak GB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in ops:
            lines.append(f"| {r.get('device')} | {r.get('bench')} | {r.get('provider')} | {r.get('shape')} | "
                         f"{r.get('dtype')} | {_fmt(r.get('median_ms'), '.3f')} | {_fmt(r.get('p20_ms'), '.3f')} | "
                         f"{_fmt(r.get('p80_ms'), '.3f')} | {_fmt(r.get('speedup'), '.2f')} | "
                         f"{_fmt(r.get('peak_mem_gb'), '.2f')} |")
    return "\n".join(lines)


def update_readme(text: str, readme: str) -> None:
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
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--readme", default=os.path.join(os.path.dirname(HERE), "README.md"))
    args = p.parse_args(argv)
    text = tables(load_rows(args.results_dir))
    print(text)
    if args.update_readme:
        update_readme(text, args.readme)


if __name__ == "__main__":
    main()
