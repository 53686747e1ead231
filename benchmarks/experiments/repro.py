"""The paper's protocol at demo scale: from the shipped demo base, TEC against the base trained
further with MAE for the same counted FLOPs, at 1x and 2x the default demo's budget, over several
seeds; metrics: k-NN and linear probe on frozen features, and a short end-to-end fine-tune.

Every (seed, budget) run is a separate process (``--jobs`` at a time, one thread each), appends
one row per model to ``benchmarks/results/repro.jsonl``; at the end the script prints mean ± std
per (budget, model), writes the plot ``--plot`` (``benchmarks/results/repro.png``; ``--no-plot``:
none) and, with ``--docs``, the table between the ``<!-- repro:begin -->`` / ``<!-- repro:end -->``
markers of ``docs/demo.md``. ``--report-only`` trains nothing but still writes the plot (and, with
``--docs``, docs/demo.md). Each run prints ``[i/N] seed S, Bx started`` on stderr as it starts
and its metrics on stdout as it ends.

    python -m benchmarks.experiments.repro                       # seeds 0,1,2; budgets 1,2; 2 jobs
    python -m benchmarks.experiments.repro --report-only --no-plot   # the table, nothing written
    python -m benchmarks.experiments.repro --report-only --docs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from benchmarks.experiments import int_list
from tec_fast.cli.flags import NON_NEGATIVE, POSITIVE, SEED, output_dir, output_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(HERE, "results", "repro.jsonl")
BEGIN, END = "<!-- repro:begin -->", "<!-- repro:end -->"
METRICS = ("knn", "linear", "finetune")


def _reused(folder: str, plan, seed: int):
    """The two models a finished demo run (same plan and seed) trained, read from its output."""
    from tec_fast.demo.run import load_trained

    doc = json.load(open(os.path.join(folder, "results.json")))
    if doc["plan"] != plan.to_dict() or doc["seed"] != seed:
        raise SystemExit(f"error: {folder} was run with another plan or seed")
    tec, mae = load_trained(plan, *(os.path.join(folder, stage, "checkpoint-last.pth")
                                    for stage in ("tec", "mae_continued")))
    return tec, mae, doc["steps"], doc["compute_match"]


def run_one(seed: int, budget: int, out: str, finetune_epochs: int, reuse: str = "",
            threads: int = 1) -> List[Dict]:
    """One seed at one budget: the two stages, then the three metrics for both models and the base."""
    import torch
    from dataclasses import replace

    from benchmarks.common import git_commit
    from tec_fast.data.demo import demo_datasets
    from tec_fast.demo.recipe import BASE_RECIPE, PLANS
    from tec_fast.demo.run import tec_encoder, train_stages
    from tec_fast.demo.shipped_base import encoder_of, load_base
    from tec_fast.evaluation.finetune import finetune_accuracy
    from tec_fast.evaluation.probe import evaluate_encoder
    from tec_fast.training.objectives import IndexedDataset

    torch.set_num_threads(threads)
    plan = PLANS["default"]
    plan = replace(plan, tec_steps=budget * plan.tec_steps)
    train_ds, test_ds = demo_datasets(BASE_RECIPE.data_seed)
    base_mae, meta = load_base()
    t0 = time.perf_counter()
    if reuse:
        tec, mae, steps, match = _reused(reuse, plan, seed)
    else:  # one process per (seed, budget): its two stages run one after the other, in it
        tec, mae, stages, match = train_stages(base_mae, IndexedDataset(train_ds), plan, out, seed, False,
                                               layout=(1, threads))
        steps = {name: r["steps"] for name, r in stages.items()}
    train_s = time.perf_counter() - t0
    rows = []
    models = {"tec": tec_encoder(tec), "mae_continued": encoder_of(mae)}
    if budget == 1:
        models["base"] = encoder_of(base_mae)  # train_stages leaves base_mae untouched
    for name, enc in models.items():
        metrics = evaluate_encoder(enc, train_ds, test_ds)
        metrics["threads"] = threads
        metrics.update(finetune_accuracy(enc, train_ds, test_ds, epochs=finetune_epochs, seed=seed))
        rows.append({"model": name, "seed": seed, "budget": budget, **metrics,
                     "tec_steps": steps["tec"], "mae_steps": steps["mae_continued"], "tec_flops": match["tec_flops"],
                     "trained_by": f"reused {reuse}" if reuse else "this run",
                     "train_s": round(train_s, 1), "finetune_epochs": finetune_epochs,
                     "base_steps": meta["recipe"]["steps"], "plan": PLANS["default"].to_dict(),
                     "commit": git_commit(),
                     "torch": str(torch.__version__), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for r in rows:
        r["wall_s"] = round(time.perf_counter() - t0, 1)  # training (or reuse) + every evaluation
    return rows


def summarise(rows: List[Dict]) -> Dict:
    groups: Dict = {}
    for r in rows:
        groups.setdefault((r["budget"], r["model"]), []).append(r)
    out = {}
    for key, rs in sorted(groups.items()):
        out[key] = {"n": len(rs), **{m: (statistics.mean(r[m] for r in rs),
                                         statistics.stdev(r[m] for r in rs) if len(rs) > 1 else 0.0)
                                     for m in METRICS}}
    return out


def table(summary: Dict) -> str:
    lines = ["| budget | model | seeds | k-NN % | linear probe % | fine-tune % |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for (budget, model), s in summary.items():
        cells = [f"{100 * s[m][0]:.1f} ± {100 * s[m][1]:.1f}" for m in METRICS]
        lines.append(f"| {budget}x | {model} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: Dict, path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 3.6))
    keys = list(summary)
    for ax, m in zip(axes, METRICS):
        ax.bar(range(len(keys)), [100 * summary[k][m][0] for k in keys],
               yerr=[100 * summary[k][m][1] for k in keys], capsize=3,
               color=["tab:blue" if k[1] == "tec" else "tab:orange" if k[1] == "mae_continued" else "tab:gray"
                      for k in keys])
        ax.set_xticks(range(len(keys)), [f"{b}x {n}" for b, n in keys], rotation=30, fontsize=7)
        ax.set_title(m)
        ax.set_ylabel("test accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_docs(summary: Dict, rows: List[Dict]) -> None:
    path = os.path.join(ROOT, "docs", "demo.md")
    text = open(path).read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: docs/demo.md has no {BEGIN} / {END} markers")
    walls = {}
    for r in rows:
        if "wall_s" in r:
            walls.setdefault(r["budget"], []).append(r["wall_s"] / 60)
    span = lambda w: f"{min(w):.0f}" if round(min(w)) == round(max(w)) else f"{min(w):.0f}-{max(w):.0f}"  # noqa: E731
    took = "; ".join(f"{b}x runs took {span(w)} min each" for b, w in sorted(walls.items()))
    reused = sorted({r["seed"] for r in rows if str(r.get("trained_by", "")).startswith("reused")})
    notes = [n for n in (took, f"the 1x models of seeds {reused} are the ones the demo runs of those seeds "
                               "trained (same plan and seed; evaluated here)" if reused else "") if n]
    body = (f"{table(summary)}\n\nmean ± std over seeds (± 0.0: one seed), from `benchmarks/results/repro.jsonl` "
            f"(`python -m benchmarks.experiments.repro` on 2 CPU cores" + "".join(f"; {n}" for n in notes) + ").")
    head, rest = text.split(BEGIN, 1)
    open(path, "w").write(head + BEGIN + "\n" + body + "\n" + END + rest.split(END, 1)[1])


def reuse_pattern(text: str) -> str:
    """``--reuse``: a folder pattern whose only field is ``{seed}``."""
    try:
        text.format(seed=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: only {{seed}} may appear in braces ({exc})") from None
    return text


def build_parser():
    from benchmarks.common import make_parser

    p = make_parser("experiments.repro", __doc__)
    p.add_argument("--seeds", type=int_list(SEED), default=[0, 1, 2], metavar="S,S,...",
                   help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--budgets", type=int_list(POSITIVE), default=[1, 2], metavar="B,B,...",
                   help="multiples of the default demo's TEC steps (default 1,2)")
    p.add_argument("--jobs", type=POSITIVE, default=2, metavar="N", help="runs at a time (default %(default)s)")
    p.add_argument("--threads", type=POSITIVE, default=1, metavar="N", help="threads per run (default %(default)s)")
    p.add_argument("--finetune-epochs", type=POSITIVE, default=3, metavar="N",
                   help="epochs of the end-to-end fine-tune each model gets for the fine-tune metric "
                        "(default %(default)s)")
    p.add_argument("--out", type=output_dir, default=os.path.join("runs", "repro"), metavar="DIR",
                   help="stage outputs (checkpoints, metrics), DIR/s<SEED>_b<BUDGET> per run (default %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: print the table of the current plan's rows in "
                        "benchmarks/results/repro.jsonl; still writes the plot (--plot, unless --no-plot) "
                        "and, with --docs, docs/demo.md")
    p.add_argument("--plot", type=output_file, default=os.path.join(HERE, "results", "repro.png"), metavar="FILE",
                   help="where the plot of the table is written (default benchmarks/results/repro.png)")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--docs", action="store_true", help="write the table into docs/demo.md")
    p.add_argument("--reuse", type=reuse_pattern, default="", metavar="PATTERN",
                   help="1x runs: evaluate the models a finished demo run trained instead of training them "
                        "again (same plan and seed); PATTERN with {seed}, e.g. runs/demo_seed{seed}")
    p.add_argument("--one", nargs=2, type=NON_NEGATIVE, metavar=("SEED", "BUDGET"), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.no_plot and args.plot != p.get_default("plot"):
        p.refuse("--no-plot", "writes no plot: give --plot FILE or --no-plot, not both")
    if args.one:
        seed, budget = args.one
        reuse = args.reuse.format(seed=seed) if args.reuse and budget == 1 else ""
        rows = run_one(seed, budget, os.path.join(args.out, f"s{seed}_b{budget}"), args.finetune_epochs, reuse,
                       args.threads)
        print(json.dumps(rows))
        return 0
    t0 = time.perf_counter()
    if not args.report_only:
        todo = [(s, b) for b in args.budgets for s in args.seeds]
        total, running = len(todo), []
        while todo or running:
            while todo and len(running) < args.jobs:
                s, b = todo.pop(0)
                print(f"[{total - len(todo)}/{total}] seed {s}, {b}x started "
                      f"({(time.perf_counter() - t0) / 60:.1f} min)", file=sys.stderr, flush=True)
                cmd = [sys.executable, "-m", "benchmarks.experiments.repro", "--one", str(s), str(b), "--out", args.out,
                       "--finetune-epochs", str(args.finetune_epochs), "--reuse", args.reuse,
                       "--threads", str(args.threads)]
                running.append(((s, b), subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
            (s, b), proc = running.pop(0)
            stdout, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"error: seed {s} budget {b} failed (exit {proc.returncode})")
            rows = json.loads(stdout.strip().splitlines()[-1])
            os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
            with open(RESULTS, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            print(f"seed {s}, {b}x: " + ", ".join(f"{r['model']} " + "/".join(f"{100 * r[m]:.1f}" for m in METRICS)
                                                 for r in rows) + f"  ({(time.perf_counter() - t0) / 60:.1f} min)",
                  flush=True)
    from tec_fast.demo.recipe import PLANS

    plan = PLANS["default"].to_dict()  # rows of earlier plans stay in the file but not in the table
    rows = [json.loads(line) for line in open(RESULTS)] if os.path.exists(RESULTS) else []
    rows = [r for r in rows if r.get("plan") == plan]
    if not rows:
        raise SystemExit(f"error: no rows of the current default plan in {RESULTS}")
    summary = summarise(rows)
    print(table(summary))
    if not args.no_plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        png = plot(summary, args.plot)
        print(f"plot: {png or 'not written (matplotlib missing)'}")
    if args.docs:
        write_docs(summary, rows)
    return 0


if __name__ == "__main__":
    from tec_fast.cli.errors import run_command

    sys.exit(run_command(main))
