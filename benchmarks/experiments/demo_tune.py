"""Tune the default demo: run one demo stage (TEC from the shipped base, or the base trained
further with MAE) with any of the plan's fields overridden, evaluate it by k-NN and linear probe,
and append one JSON row to ``--out`` (``benchmarks/results/demo_tuning/tune.jsonl``).
Progress (the stage's training line, then the evaluation) goes to stderr.

    python -m benchmarks.experiments.demo_tune tec --tec-steps 700 --batch-size 32 --seed 0
    python -m benchmarks.experiments.demo_tune mae --tec-steps 700 --batch-size 32 --seed 0   # FLOP-matched MAE

``mae`` counts the MAE steps that match the TEC stage of the same plan (the demo's own rule) unless
``--mae-steps`` is given. One thread by default (``--threads``), so two runs fit on two cores.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

from tec_fast.cli.flags import POSITIVE, SEED, output_file, real

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
RESULTS = os.path.join(HERE, "results", "demo_tuning", "tune.jsonl")


def field_type(name: str, kind: str):
    """The parse-time type of the plan field ``name`` (``kind``: int or float): counts and sizes
    positive; ``warmup_frac`` in [0, 1); ``mask_ratio`` in (0, 1); rates and temperatures > 0."""
    if kind == "int":
        return POSITIVE
    if name == "warmup_frac":
        return real(0.0, 1.0, hi_open=True)
    if name == "mask_ratio":
        return real(0.0, 1.0, lo_open=True, hi_open=True)
    return real(0.0, lo_open=True)


def build_parser():
    from benchmarks.common import make_parser
    from tec_fast.demo.recipe import PLANS

    p = make_parser("experiments.demo_tune", __doc__)
    p.add_argument("stage", choices=("tec", "mae"), help="which demo stage to run")
    p.add_argument("--plan", default="default", choices=sorted(PLANS), help="plan to start from")
    for field in dataclasses.fields(PLANS["default"]):
        if field.name in ("mode", "make_base", "n_train", "n_test"):
            continue
        kind = str(field.type).replace("Optional[", "").rstrip("]")
        p.add_argument("--" + field.name.replace("_", "-"), type=field_type(field.name, kind), default=None,
                       metavar=kind.upper(), help=f"override the plan's {field.name}")
    p.add_argument("--mae-steps", type=POSITIVE, default=None, metavar="N", help="MAE steps (default: FLOP-matched)")
    p.add_argument("--seed", type=SEED, default=0,
                   help="the stage's training seed: data order, masks and (tec) the new model's weights "
                        "(default %(default)s)")
    p.add_argument("--threads", type=POSITIVE, default=1, metavar="N", help="torch CPU threads (default %(default)s)")
    p.add_argument("--tag", default="", help="a free-text label stored in the row and printed, to tell runs apart")
    p.add_argument("--out", type=output_file, default=RESULTS, metavar="FILE",
                   help="JSONL file to append the row to (default benchmarks/results/demo_tuning/tune.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no training progress line on stderr")
    return p


def main(argv=None) -> int:
    from tec_fast.demo.recipe import PLANS

    args = build_parser().parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from benchmarks.common import git_commit
    from tec_fast.data.demo import demo_datasets
    from tec_fast.demo import run as demo
    from tec_fast.demo.recipe import BASE_RECIPE
    from tec_fast.demo.shipped_base import encoder_of, load_base
    from tec_fast.evaluation.probe import evaluate_encoder
    from tec_fast.training.objectives import IndexedDataset

    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k in {f.name for f in dataclasses.fields(PLANS["default"])}}
    plan = dataclasses.replace(PLANS[args.plan], **overrides)
    train_ds, test_ds = demo_datasets(BASE_RECIPE.data_seed, plan.n_train, plan.n_test)
    train = IndexedDataset(train_ds)
    base_mae, _ = load_base()
    progress = not args.no_progress
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if args.stage == "tec":
            say(f"[1/2] training the tec stage ({plan.tec_steps} steps, seed {args.seed}) ...")
            tec, result = demo._tec_stage(base_mae, train, plan, out, args.seed, progress=progress)
            encoder, steps = demo.tec_encoder(tec), plan.tec_steps
        else:
            steps = args.mae_steps or demo.matched_steps(base_mae, train, plan)["mae_steps"]
            say(f"[1/2] training the mae stage ({steps} steps, seed {args.seed}) ...")
            result = demo._mae_stage(base_mae, train, plan, out, args.seed, steps, progress=progress)
            encoder = encoder_of(result.model)
        train_s = time.perf_counter() - t0
    say(f"[1/2] trained in {train_s:.0f} s; [2/2] k-NN and linear probe ...")
    t1 = time.perf_counter()
    metrics = evaluate_encoder(encoder, train_ds, test_ds)
    say(f"[2/2] evaluated in {time.perf_counter() - t1:.0f} s")
    row = {"stage": args.stage, "tag": args.tag, "seed": args.seed, "steps": steps, "plan": plan.to_dict(),
           "knn": metrics["knn"], "linear": metrics["linear"], "train_s": round(train_s, 1),
           "s_per_step": round(train_s / steps, 4), "threads": args.threads, "load1": os.getloadavg()[0],
           "final_loss": result.losses[-1] if result.losses else None, "commit": git_commit(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{args.stage} {args.tag} seed {args.seed}: {steps} steps, k-NN {100 * metrics['knn']:.1f} "
          f"linear {100 * metrics['linear']:.1f}, {train_s / 60:.1f} min")
    return 0


def say(line: str) -> None:
    """A progress line on stderr (stdout keeps the result line alone)."""
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    from tec_fast.cli.errors import run_command

    raise SystemExit(run_command(main))
