"""The default demo over several seeds: runs ``python -m tec_fast.train --seed S`` for each seed
(or collects finished runs with ``--collect DIR ...``), appends one row per run to ``--results``
(``benchmarks/results/demo.jsonl``) and, with ``--readme``, writes the per-seed table between the
``<!-- demo:begin -->`` / ``<!-- demo:end -->`` markers of README.md.

    python -m benchmarks.experiments.demo_seeds --seeds 0,1,2 --readme
    python -m benchmarks.experiments.demo_seeds --collect runs/demo_s0 runs/demo_s1 --readme
    python -m benchmarks.experiments.demo_seeds --report-only            # print the table
    python -m benchmarks.experiments.demo_seeds --report-only --readme   # and write it into README.md

Each run prints ``[i/N] seed S ...`` and ``[i/N] seed S done in T s`` on stderr, with the train
command's own progress line between them (``--no-progress``: the per-run lines alone).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.experiments import int_list
from tec_fast.cli.flags import SEED, existing_dir, output_dir, output_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(HERE, "results", "demo.jsonl")
BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"
ROWS = ("pixels", "random_init", "base", "mae_continued", "tec")


def row_of(folder: str, note: str) -> dict:
    doc = json.load(open(os.path.join(folder, "results.json")))
    return {"seed": doc["seed"], "mode": doc["mode"], "seconds": doc["seconds"], "note": note,
            "steps": doc["steps"], "threads": doc["machine"]["threads"], "torch": doc["machine"]["torch"],
            "stage_processes": doc["machine"].get("stage_processes", 1), "stage_seconds": doc.get("stage_seconds"),
            "plan": doc["plan"],
            **{r: doc[r] for r in ROWS}, "tec_minus_base": doc["tec_minus_base"],
            "tec_minus_mae_continued": doc["tec_minus_mae_continued"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": _commit()}


def _commit() -> str:
    from benchmarks.common import git_commit
    return git_commit()


def table(rows) -> str:
    head = "| seed | " + " | ".join(ROWS) + " | TEC − base | TEC − MAE-continued | time |"
    lines = [head, "| ---: |" + " ---: |" * (len(ROWS) + 3)]
    for r in sorted(rows, key=lambda r: r["seed"]):
        cells = [f"{100 * r[n]['knn']:.1f} / {100 * r[n]['linear']:.1f}" for n in ROWS]
        gains = [f"{100 * r[k]['knn']:+.1f} / {100 * r[k]['linear']:+.1f}"
                 for k in ("tec_minus_base", "tec_minus_mae_continued")]
        m, s = divmod(round(r["seconds"]), 60)
        lines.append(f"| {r['seed']} | " + " | ".join(cells + gains) + f" | {m}:{s:02d} ({r['note']}) |")
    return "\n".join(lines)


def finished_run(text: str) -> str:
    """``--collect DIR``: a folder holding a finished demo run's results.json."""
    existing_dir(text)
    if not os.path.isfile(os.path.join(text, "results.json")):
        raise argparse.ArgumentTypeError(f"{text!r} holds no results.json (not a finished demo run)")
    return text


def build_parser():
    from benchmarks.common import make_parser

    p = make_parser("experiments.demo_seeds", __doc__)
    p.add_argument("--seeds", type=int_list(SEED), default=[0, 1, 2], metavar="S,S,...",
                   help="the seeds to run the default demo with, one train run each (default 0,1,2)")
    p.add_argument("--out", type=output_dir, default=os.path.join("runs", "demo_seeds"), metavar="DIR",
                   help="where the runs write: DIR/seed<S> per seed (default %(default)s)")
    p.add_argument("--collect", nargs="+", type=finished_run, metavar="DIR",
                   help="finished demo folders (each with its results.json) to add instead of running")
    p.add_argument("--note", default="", help="how the machine was loaded, for the table")
    p.add_argument("--results", type=output_file, default=RESULTS, metavar="FILE",
                   help="the JSON-lines file rows are appended to and --report-only / --readme read "
                        "(default benchmarks/results/demo.jsonl)")
    p.add_argument("--readme", action="store_true",
                   help="write the current plan's table (newest row per seed) into README.md")
    p.add_argument("--report-only", action="store_true",
                   help="run and collect nothing: print the current plan's table (newest row per seed) from "
                        "--results, and with --readme write it into README.md")
    p.add_argument("--no-progress", action="store_true",
                   help="no train progress line; the per-run start and done lines on stderr stay")
    return p


def current_rows(path: str):
    """The newest row per seed of the current default plan in the JSON-lines file ``path``."""
    from tec_fast.demo.recipe import PLANS

    plan = PLANS["default"].to_dict()
    latest = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("plan") == plan and r["mode"] == "default":
                latest[r["seed"]] = r
    return list(latest.values())


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.report_only and args.collect:
        p.refuse("--report-only", "collects nothing: give --collect or --report-only, not both")
    if args.report_only and not os.path.isfile(args.results):
        p.refuse("--report-only", f"no rows to report: {args.results!r} does not exist")
    folders = list(args.collect or [])
    if not args.collect and not args.report_only:
        for i, seed in enumerate(args.seeds, 1):
            folder = os.path.join(args.out, f"seed{seed}")
            what = f"[{i}/{len(args.seeds)}] seed {seed}"
            print(f"{what}: python -m tec_fast.train --seed {seed} --output {folder} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "tec_fast.train", "--seed", str(seed), "--output", folder]
            done = subprocess.run(cmd + (["--no-progress"] if args.no_progress else []))
            if done.returncode:
                print(f"error: {what}: the train command failed (exit {done.returncode}); runs finished before it "
                      f"are in {args.out}", file=sys.stderr)
                return 1
            print(f"{what} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            folders.append(folder)
    rows = [row_of(f, args.note) for f in folders]
    if rows:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(table(rows))
    if args.report_only or args.readme:
        current = current_rows(args.results)
        if args.report_only:
            if not current:
                p.refuse("--report-only", f"{args.results!r} has no row of the current default plan")
            print(table(current))
    if args.readme:
        if not current:
            p.refuse("--readme", f"{args.results!r} has no row of the current default plan")
        wins = all(r[k][m] > 0 for r in current for k in ("tec_minus_base", "tec_minus_mae_continued")
                   for m in ("knn", "linear"))
        path = os.path.join(ROOT, "README.md")
        readme = open(path).read()
        if BEGIN not in readme or END not in readme:
            p.refuse("--readme", f"README.md has no {BEGIN} / {END} markers")
        head, rest = readme.split(BEGIN, 1)
        commits = sorted({r.get("commit", "not recorded") for r in current})
        where = os.path.abspath(args.results)
        where = os.path.relpath(where, ROOT) if where.startswith(ROOT + os.sep) else args.results
        body = ("k-NN % / linear probe %, test split, `python -m tec_fast.train --seed S` (rows from "
                f"`{where}`, collected by `python -m benchmarks.experiments.demo_seeds`; "
                f"commit {', '.join(commits)}). TEC "
                + ("beats" if wins else "does NOT beat") + " the base and MAE-continued on both metrics for "
                "every seed:\n\n" + table(current))
        open(path, "w").write(head + BEGIN + "\n" + body + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    from tec_fast.cli.errors import run_command

    sys.exit(run_command(main))
