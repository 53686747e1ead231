"""The embedded demo (``python -m tec_fast.train`` with no arguments): TEC's claim, small.

From an existing base (an MAE ViT trained on the demo data by ``--demo-make-base`` and shipped in
the package), train (a) a new model with TEC and (b) the same base further with MAE for the same
counted FLOPs, then evaluate raw pixels, a random-init ViT, the base, MAE-continued and TEC by
k-NN and a linear probe on frozen features. Prints a table, writes ``DIR/results.json`` and
``DIR/results.png``. Every stage has a fixed step count: the numbers depend on the seed, not on
how busy the machine is. The demo data has no augmentation, so the base's targets are computed
once per image and looked up (``TargetCache``); the TEC stage is charged for that forward pass.

``--demo-from-scratch`` trains the base first (the recipe in ``recipe.BASE_RECIPE``);
``--demo-tiny`` is a smoke run on a subset (its numbers mean nothing).
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Dict

import torch

from tec_fast.config import TECConfig
from tec_fast.data.demo import demo_arrays, demo_datasets
from tec_fast.demo import compute
from tec_fast.demo.plot import write_plot
from tec_fast.demo.recipe import BASE_RECIPE, DEMO_IMG, DEMO_MODEL, PLANS, DemoPlan
from tec_fast.demo.shipped_base import encoder_of, load_base, train_base
from tec_fast.evaluation.probe import evaluate_encoder, pixel_baseline
from tec_fast.checkpoint import export_timm
from tec_fast.models.base import BaseModel
from tec_fast.models.tec import TECModel
from tec_fast.presets import vit_preset
from tec_fast.training import FitConfig, fit, masking_noise
from tec_fast.training.monitor import format_duration, table
from tec_fast.training.objectives import IndexedDataset, MAEObjective, TargetCache, TECObjective

ROWS = {
    "pixels": "raw normalised pixels, no model",
    "random_init": "the demo ViT with random weights, frozen",
    "base": "the existing MAE base (shipped; its recipe in demo_base.json)",
    "mae_continued": "the base trained further with MAE, same FLOPs as the TEC stage",
    "tec": "a new ViT TEC-trained from the frozen base",
}


def plan_for(args) -> DemoPlan:
    scratch = args.demo_from_scratch or getattr(args, "demo_long", False)
    plan = PLANS["tiny" if args.demo_tiny else "from_scratch" if scratch else "default"]
    if getattr(args, "demo_steps", None):
        from dataclasses import replace
        plan = replace(plan, tec_steps=args.demo_steps)
    return plan


def _fit_config(name: str, out: str, steps: int, lr: float, plan: DemoPlan, seed: int, progress: bool) -> FitConfig:
    return FitConfig(name=name, output_dir=os.path.join(out, name), max_steps=steps,
                     batch_size=plan.batch_size, lr=lr, warmup_steps=plan.warmup(steps), precision="fp32",
                     seed=seed, log_every=max(1, steps // 20), save_every_epochs=10 ** 6, keep_last=1,
                     progress=progress)


def _tec_stage(base_mae, train_indexed, plan: DemoPlan, out: str, seed: int, progress: bool):
    """Targets from the frozen base (cached), then a new TEC model trained from them."""
    vit = vit_preset(DEMO_MODEL, DEMO_IMG)
    base = encoder_of(base_mae, last_layers=plan.last_layers, topk=plan.topk)
    cache = TargetCache(base, train_indexed)
    torch.manual_seed(seed + 1)
    tec = TECModel(TECConfig(encoder=vit, decoder_dim=plan.decoder_dim, decoder_depth=plan.decoder_depth,
                             decoder_heads=plan.decoder_heads, tau=plan.tau))
    objective = TECObjective(base, plan.mask_ratio, vit.num_patches, cache)
    result = fit(tec, objective, train_indexed,
                 _fit_config("tec", out, plan.tec_steps, plan.tec_lr, plan, seed, progress))
    return tec, objective, base, result


def _matched_steps(tec, tec_objective, base, mae, train_indexed, plan: DemoPlan) -> Dict[str, int]:
    """MAE steps of the same counted FLOPs as the TEC stage (see ``compute``)."""
    batch = next(iter(torch.utils.data.DataLoader(train_indexed, batch_size=plan.batch_size)))
    L = mae.config.num_patches
    noise = masking_noise(0, 0, 0, plan.batch_size, L, 0, 1)
    tec_step = compute.step_flops(tec, tec_objective, batch, noise)
    mae_step = compute.step_flops(mae, MAEObjective(plan.mask_ratio, L), batch, noise)
    per_image = compute.forward_flops(base, batch[0]) // plan.batch_size
    return compute.matched_mae_steps(plan.tec_steps, tec_step, mae_step, per_image, len(train_indexed))


def train_stages(base_mae, train_indexed, plan: DemoPlan, out: str, seed: int, progress: bool):
    """The TEC stage from the frozen base, then the base trained further with MAE for the same
    counted FLOPs (``base_mae`` is trained in place). Returns (tec model, TEC FitResult, MAE
    FitResult, the compute match)."""
    print(f"\n== TEC: a new ViT from the frozen base, {plan.tec_steps} steps")
    tec, tec_objective, base, r_tec = _tec_stage(base_mae, train_indexed, plan, out, seed, progress)
    match = _matched_steps(tec, tec_objective, base, base_mae, train_indexed, plan)
    print(f"\n== MAE continued: the base trained further, {match['mae_steps']} steps "
          f"(= the TEC stage's {match['tec_flops'] / 1e12:.2f} TFLOP, counted)")
    r_mae = fit(base_mae, MAEObjective(plan.mask_ratio, base_mae.config.num_patches), train_indexed,
                _fit_config("mae_continued", out, match["mae_steps"], plan.mae_lr, plan, seed, progress))
    return tec, r_tec, r_mae, match


def tec_encoder(tec: TECModel) -> BaseModel:
    """The TEC model's encoder (input adapter folded into the CLS token) as a frozen ``BaseModel``."""
    encoder = BaseModel(vit_preset(DEMO_MODEL, DEMO_IMG))
    encoder.load_checkpoint(export_timm(tec))
    return encoder


def _evaluate_rows(encoders: Dict[str, BaseModel], train_ds, test_ds, arrays) -> Dict[str, dict]:
    results = {"pixels": pixel_baseline(*arrays)}
    for name, encoder in encoders.items():
        t0 = time.perf_counter()
        results[name] = evaluate_encoder(encoder, train_ds, test_ds)
        print(f"  {name:<14} k-NN {100 * results[name]['knn']:5.1f}  linear {100 * results[name]['linear']:5.1f}"
              f"  ({format_duration(time.perf_counter() - t0)})", flush=True)
    return results


def _base(plan: DemoPlan, out: str, progress: bool, train_ds, test_ds, folder=None):
    if not plan.make_base:
        return load_base(folder)
    print(f"\n== the base: MAE pretraining on the demo data, {BASE_RECIPE.steps} steps (--demo-from-scratch)")
    return train_base(BASE_RECIPE, os.path.join(out, "base"), progress,
                      lambda enc: evaluate_encoder(enc, train_ds, test_ds))


def run_demo(args) -> int:
    plan, seed, progress = plan_for(args), args.seed, not args.no_progress
    out = args.output or os.path.join("runs", "demo")
    os.makedirs(out, exist_ok=True)
    t_all = time.perf_counter()
    print(f"TEC demo ({plan.mode}, seed {seed}): an existing MAE base -> TEC vs. MAE continued for the "
          f"same FLOPs -> k-NN / linear probe. Output: {out}")
    train_ds, test_ds = demo_datasets(BASE_RECIPE.data_seed, plan.n_train, plan.n_test)
    train_indexed = IndexedDataset(train_ds)
    base_dir = getattr(args, "demo_base", None)
    base_mae, base_meta = _base(plan, out, progress, train_ds, test_ds, base_dir)
    print(f"base: {base_meta['recipe']['steps']} MAE steps, k-NN {100 * base_meta['eval'].get('knn', float('nan')):.1f} "
          f"/ linear {100 * base_meta['eval'].get('linear', float('nan')):.1f} when made")

    base_encoder = encoder_of(base_mae)  # a copy: the MAE-continued stage trains base_mae in place
    tec, r_tec, r_mae, match = train_stages(base_mae, train_indexed, plan, out, seed, progress)
    print("\n== evaluation: k-NN (cosine, k=20) and linear probe on frozen, mean-pooled features")
    torch.manual_seed(seed + 2)
    encoders = {"random_init": BaseModel(vit_preset(DEMO_MODEL, DEMO_IMG)), "base": base_encoder,
                "mae_continued": encoder_of(r_mae.model), "tec": tec_encoder(tec)}
    results = _evaluate_rows(encoders, train_ds, test_ds, demo_arrays(BASE_RECIPE.data_seed, plan.n_train, plan.n_test))
    stages = {"tec": r_tec, "mae_continued": r_mae}
    _report(out, plan, seed, results, stages, match, base_meta, time.perf_counter() - t_all)
    return 0


def _report(out: str, plan: DemoPlan, seed: int, results: dict, stages: dict, match: dict,
            base_meta: dict, seconds: float) -> None:
    gain = {ref: {m: results["tec"][m] - results[ref][m] for m in ("knn", "linear")}
            for ref in ("base", "mae_continued")}
    steps = {name: r.steps for name, r in stages.items()}
    rows = [[name, f"{100 * results[name]['knn']:.1f}", f"{100 * results[name]['linear']:.1f}",
             ROWS[name] + (f" ({steps[name]} steps)" if name in steps else "")] for name in ROWS]
    print("\n" + table(["row", "k-NN %", "linear %", "what the row is"], rows, align="lrrl",
                       title=f"demo results ({plan.mode}, seed {seed}; test split)"))
    for ref, g in gain.items():
        beat = all(v > 0 for v in g.values())
        print(f"TEC {'beats' if beat else 'does NOT beat'} {ref}: k-NN {100 * g['knn']:+.1f}, "
              f"linear probe {100 * g['linear']:+.1f} points")
    curves = {name: r.losses for name, r in stages.items()}
    plot = write_plot(os.path.join(out, "results.png"), {n: results[n] for n in ROWS}, curves,
                      f"TEC demo, seed {seed}")
    print(f"plot: {plot}" if plot else "plot: not written (matplotlib is missing: pip install 'tec_fast[demo]' "
                                       "or pip install matplotlib)")
    doc = {**results, "tec_minus_base": gain["base"], "tec_minus_mae_continued": gain["mae_continued"],
           "seed": seed, "mode": plan.mode, "rows": ROWS, "steps": steps, "compute_match": match,
           "plan": plan.to_dict(), "base_record": base_meta, "seconds": round(seconds, 1),
           "losses": curves, "plot": plot,
           "machine": {"threads": torch.get_num_threads(), "platform": platform.platform(),
                       "torch": str(torch.__version__)}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"total {format_duration(seconds)}; results in {os.path.join(out, 'results.json')}")


def make_demo_base(args) -> int:
    """``--demo-make-base``: train the demo base by ``BASE_RECIPE`` and write it to ``--output``."""
    out = args.output or os.path.join("runs", "demo_base")
    os.makedirs(out, exist_ok=True)
    r = BASE_RECIPE
    print(f"demo base: MAE on the demo data, {r.steps} steps, batch {r.batch_size}, lr {r.lr}, seed {r.seed}. "
          f"Output: {out}")
    train_ds, test_ds = demo_datasets(r.data_seed)
    _, meta = train_base(r, out, not args.no_progress, lambda enc: evaluate_encoder(enc, train_ds, test_ds))
    print(table(["steps", "minutes", "k-NN %", "linear %", "data"],
                [[meta["steps_done"], f"{meta['train_seconds'] / 60:.1f}", f"{100 * meta['eval']['knn']:.1f}",
                  f"{100 * meta['eval']['linear']:.1f}", meta["data_fingerprint"]]], title="demo base"))
    print(f"wrote {os.path.join(out, 'demo_base.pth')} and demo_base.json; the demo uses it with "
          f"--demo-base {out} (the package ships one in tec_fast/demo/assets/)")
    return 0
