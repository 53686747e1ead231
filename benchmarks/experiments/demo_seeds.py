"""The default demo over several seeds: runs ``python -m tec_fast.train --seed S`` for each seed
(or collects finished runs with ``--collect DIR ...``), appends one row per run to
``benchmarks/results/demo.jsonl`` and, with ``--readme``, writes the per-seed table between the
``<!-- demo:begin -->`` / ``<!-- demo:end -->`` markers of README.md.

    python -m benchmarks.experiments.demo_seeds --seeds 0,1,2 --readme
    python -m benchmarks.experiments.demo_seeds --collect runs/demo_s0 runs/demo_s1 --readme
    python -m benchmarks.experiments.demo_seeds --report-only --readme
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=os.path.join("runs", "demo_seeds"))
    p.add_argument("--collect", nargs="+", metavar="DIR", help="finished demo folders instead of running")
    p.add_argument("--note", default="", help="how the machine was loaded, for the table")
    p.add_argument("--readme", action="store_true", help="write the current plan's table into README.md")
    p.add_argument("--report-only", action="store_true", help="run and collect nothing (with --readme)")
    args = p.parse_args(argv)
    folders = args.collect or []
    if not args.collect and not args.report_only:
        for seed in args.seeds.split(","):
            folder = os.path.join(args.out, f"seed{seed}")
            subprocess.run([sys.executable, "-m", "tec_fast.train", "--seed", seed, "--output", folder,
                            "--no-progress"], check=True)
            folders.append(folder)
    rows = [row_of(f, args.note) for f in folders]
    if rows:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(table(rows))
    if args.readme:
        from tec_fast.demo.recipe import PLANS

        plan = PLANS["default"].to_dict()
        latest = {}  # the newest row per seed of the current default plan
        for line in open(RESULTS):
            r = json.loads(line)
            if r.get("plan") == plan and r["mode"] == "default":
                latest[r["seed"]] = r
        current = list(latest.values())
        wins = all(r[k][m] > 0 for r in current for k in ("tec_minus_base", "tec_minus_mae_continued")
                   for m in ("knn", "linear"))
        path = os.path.join(ROOT, "README.md")
        readme = open(path).read()
        head, rest = readme.split(BEGIN, 1)
        commits = sorted({r.get("commit", "not recorded") for r in current})
        body = ("k-NN % / linear probe %, test split, `python -m tec_fast.train --seed S` (rows from "
                "`benchmarks/results/demo.jsonl`, collected by `python -m benchmarks.experiments.demo_seeds`; "
                f"commit {', '.join(commits)}). TEC "
                + ("beats" if wins else "does NOT beat") + " the base and MAE-continued on both metrics for "
                "every seed:\n\n" + table(current))
        open(path, "w").write(head + BEGIN + "\n" + body + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
