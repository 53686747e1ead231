"""Tune the default demo: run one demo stage (TEC from the shipped base, or the base trained
further with MAE) with any of the plan's fields overridden, evaluate it by k-NN and linear probe,
and append one JSON row to ``benchmarks/results/demo_tuning/tune.jsonl``.

    python -m benchmarks.experiments.demo_tune tec --tec-steps 700 --batch-size 32 --seed 0
    python -m benchmarks.experiments.demo_tune mae --tec-steps 700 --batch-size 32 --seed 0   # FLOP-matched MAE

``mae`` counts the MAE steps that match the TEC stage of the same plan (the demo's own rule) unless
``--mae-steps`` is given. One thread by default (``--threads``), so two runs fit on two cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
RESULTS = os.path.join(HERE, "results", "demo_tuning", "tune.jsonl")


def main(argv=None) -> int:
    from tec_fast.demo.recipe import PLANS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("tec", "mae"), help="which demo stage to run")
    p.add_argument("--plan", default="default", choices=sorted(PLANS), help="plan to start from")
    for field in dataclasses.fields(PLANS["default"]):
        if field.name in ("mode", "make_base", "n_train", "n_test"):
            continue
        kind = {"int": int, "float": float}.get(str(field.type).replace("Optional[", "").rstrip("]"), float)
        p.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None,
                       help=f"override the plan's {field.name}")
    p.add_argument("--mae-steps", type=int, default=None, help="MAE steps (default: FLOP-matched)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=RESULTS, help="JSONL file to append the row to")
    args = p.parse_args(argv)

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
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if args.stage == "tec":
            tec, result = demo._tec_stage(base_mae, train, plan, out, args.seed, progress=False)
            encoder, steps = demo.tec_encoder(tec), plan.tec_steps
        else:
            steps = args.mae_steps or demo.matched_steps(base_mae, train, plan)["mae_steps"]
            result = demo._mae_stage(base_mae, train, plan, out, args.seed, steps, progress=False)
            encoder = encoder_of(result.model)
        train_s = time.perf_counter() - t0
    metrics = evaluate_encoder(encoder, train_ds, test_ds)
    row = {"stage": args.stage, "tag": args.tag, "seed": args.seed, "steps": steps, "plan": plan.to_dict(),
           "knn": metrics["knn"], "linear": metrics["linear"], "train_s": round(train_s, 1),
           "s_per_step": round(train_s / steps, 4), "threads": args.threads, "load1": os.getloadavg()[0],
           "final_loss": result.losses[-1] if result.losses else None, "commit": git_commit(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{args.stage} {args.tag} seed {args.seed}: {steps} steps, k-NN {100 * metrics['knn']:.1f} "
          f"linear {100 * metrics['linear']:.1f}, {train_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
