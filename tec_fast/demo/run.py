"""The embedded demo (``python -m tec_fast.train`` with no arguments): TEC's claim, small.

From an existing base (an MAE ViT trained on the demo data by ``--demo-make-base`` and shipped in
the package), train (a) a new model with TEC and (b) the same base further with MAE for the same
counted FLOPs, then evaluate raw pixels, a random-init ViT, the base, MAE-continued and TEC by
k-NN and a linear probe on frozen features. Prints a table, writes ``DIR/results.json`` and
``DIR/results.png``.

Every stage has a fixed step count, and the two stages run side by side in two worker processes
with half the cores each (one after the other on a single core): the thread count follows the
machine's core count, never its load, so a busy machine only takes longer and on a given machine the
numbers depend on the seed alone. The fixed rows (pixels, random_init, base) are evaluated while the stages train.
The demo data has no augmentation, so the base's targets are computed once per image and looked up
(``TargetCache``); the TEC stage is charged for that forward pass.

``--demo-from-scratch`` trains the base first (the recipe in ``recipe.BASE_RECIPE``);
``--demo-tiny`` is a smoke run on a subset (its numbers mean nothing).
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import platform
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from tec_fast.config import TECConfig
from tec_fast.data.demo import demo_arrays, demo_datasets
from tec_fast.demo import compute
from tec_fast.demo.plot import write_plot
from tec_fast.demo.recipe import BASE_RECIPE, DEMO_IMG, DEMO_MODEL, PLANS, DemoPlan
from tec_fast.demo.shipped_base import encoder_of, load_base, new_mae, train_base
from tec_fast.evaluation.probe import evaluate_encoder, pixel_baseline
from tec_fast.checkpoint import export_timm
from tec_fast.models.base import BaseModel
from tec_fast.models.tec import TECModel
from tec_fast.presets import vit_preset
from tec_fast.training import FitConfig, fit, masking_noise
from tec_fast.training.monitor import format_duration, table, write_status_line
from tec_fast.training.objectives import IndexedDataset, MAEObjective, TargetCache, TECObjective
from tec_fast.training.run_lock import hold_output_lock

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
                     seed=seed, log_every=max(1, steps // 50), save_every_epochs=10 ** 6, keep_last=1,
                     progress=progress)


def new_tec(plan: DemoPlan) -> TECModel:
    vit = vit_preset(DEMO_MODEL, DEMO_IMG)
    return TECModel(TECConfig(encoder=vit, decoder_dim=plan.decoder_dim, decoder_depth=plan.decoder_depth,
                              decoder_heads=plan.decoder_heads, tau=plan.tau))


def _tec_stage(base_mae, train_indexed, plan: DemoPlan, out: str, seed: int, progress: bool):
    """Targets from the frozen base (cached), then a new TEC model trained from them."""
    base = encoder_of(base_mae, last_layers=plan.last_layers, topk=plan.topk)
    cache = TargetCache(base, train_indexed)
    torch.manual_seed(seed + 1)
    tec = new_tec(plan)
    objective = TECObjective(base, plan.mask_ratio, tec.config.encoder.num_patches, cache)
    result = fit(tec, objective, train_indexed,
                 _fit_config("tec", out, plan.tec_steps, plan.tec_lr, plan, seed, progress))
    return tec, result


def _mae_stage(base_mae, train_indexed, plan: DemoPlan, out: str, seed: int, steps: int, progress: bool):
    """The base trained further with MAE (in place), ``steps`` steps with its own schedule."""
    return fit(base_mae, MAEObjective(plan.mask_ratio, base_mae.config.num_patches), train_indexed,
               _fit_config("mae_continued", out, steps, plan.mae_lr, plan, seed, progress))


def load_trained(plan: DemoPlan, tec_checkpoint: str, mae_checkpoint: str):
    """(TEC model, MAE-continued model) from the two stages' checkpoints."""
    tec, mae = new_tec(plan), new_mae()
    for model, path in ((tec, tec_checkpoint), (mae, mae_checkpoint)):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return tec, mae


def matched_steps(base_mae, train_indexed, plan: DemoPlan) -> Dict[str, int]:
    """MAE steps of the same counted FLOPs as the TEC stage (see ``compute``), counted on one
    batch with fresh models (FLOPs do not depend on the weights)."""
    first = torch.utils.data.Subset(train_indexed, range(min(plan.batch_size, len(train_indexed))))
    batch = next(iter(torch.utils.data.DataLoader(first, batch_size=plan.batch_size)))
    L = base_mae.config.num_patches
    base = encoder_of(base_mae, last_layers=plan.last_layers, topk=plan.topk)
    noise = masking_noise(0, 0, 0, len(batch[0]), L, 0, 1)
    tec_step = compute.step_flops(new_tec(plan), TECObjective(base, plan.mask_ratio, L, TargetCache(base, first)),
                                  batch, noise)
    mae_step = compute.step_flops(base_mae, MAEObjective(plan.mask_ratio, L), batch, noise)  # weights untouched
    per_image = compute.forward_flops(base, batch[0]) // len(batch[0])
    return compute.matched_mae_steps(plan.tec_steps, tec_step, mae_step, per_image, len(train_indexed))


def _run_stage(job: dict) -> dict:
    """One training stage, in this process or in a worker process (``job`` holds only plain data
    and the base's weights). The trained weights are in ``OUT/<stage>/checkpoint-last.pth``."""
    torch.set_num_threads(job["threads"])
    plan, seed, out, progress = job["plan"], job["seed"], job["out"], job["progress"]
    train_ds, _ = demo_datasets(BASE_RECIPE.data_seed, plan.n_train, plan.n_test)
    train = IndexedDataset(train_ds)
    base_mae = new_mae()
    base_mae.load_state_dict(torch.load(io.BytesIO(job["base_state"]), map_location="cpu", weights_only=True))
    if job["stage"] == "tec":
        r = _tec_stage(base_mae, train, plan, out, seed, progress)[1]
    else:
        r = _mae_stage(base_mae, train, plan, out, seed, job["steps"], progress)
    return {"stage": job["stage"], "steps": r.steps, "losses": r.losses, "seconds": r.seconds,
            "checkpoint": r.checkpoint}


def stage_layout() -> Tuple[int, int]:
    """(processes, threads per process) for the two stages: side by side on half the cores each
    when there are at least two, else one after the other. It depends on the machine's core
    count only (never on its load), so a run's numbers are fixed by the seed on a given machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return (2, cores // 2) if cores >= 2 else (1, 1)


class _StageProgress:
    """One progress line for the two stages running side by side, read from their metrics logs."""

    def __init__(self, out: str, totals: Dict[str, int], enabled: bool):
        self.out, self.totals, self.enabled = out, totals, enabled
        self.t0, self.last_print, self.tty = time.perf_counter(), 0.0, sys.stderr.isatty()

    def _step(self, stage: str) -> int:
        step = 0
        try:
            with open(os.path.join(self.out, stage, "metrics.jsonl")) as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # still being written
                    record = json.loads(line)
                    # a log reused from an earlier run in the same folder: count from this run's start
                    step = 0 if record.get("event") == "start" else max(step, record.get("step", 0))
        except OSError:
            pass
        return step

    def update(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last_print < (1.0 if self.tty else 30.0)):
            return
        self.last_print = now
        done = {s: self._step(s) for s in self.totals}
        frac = sum(done.values()) / max(1, sum(self.totals.values()))
        elapsed = now - self.t0
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        line = "  ".join(f"[{s}] {done[s]}/{n}" for s, n in self.totals.items())
        line += f"  {100 * frac:3.0f}%  elapsed {format_duration(elapsed)}  ETA {format_duration(eta)}"
        write_status_line(sys.stderr, line, self.tty, final)


def train_stages(base_mae, train_indexed, plan: DemoPlan, out: str, seed: int, progress: bool,
                 layout: Optional[Tuple[int, int]] = None, while_training: Optional[Callable[[], None]] = None):
    """The TEC stage from the frozen base and the base trained further with MAE for the same
    counted FLOPs, side by side in two worker processes (``layout``: see ``stage_layout``) or one
    after the other in this one. ``while_training`` runs here meanwhile. ``base_mae`` is left
    untouched. Returns (tec model, mae_continued model, {stage: result dict}, the compute match)."""
    processes, threads = layout or stage_layout()
    match = matched_steps(base_mae, train_indexed, plan)
    print(f"\n== training, {'side by side' if processes > 1 else 'one after the other'} "
          f"({threads} thread{'s' * (threads > 1)} each):\n"
          f"  tec            a new ViT from the frozen base, {plan.tec_steps} steps\n"
          f"  mae_continued  the base trained further, {match['mae_steps']} steps "
          f"(= the TEC stage's {match['tec_flops'] / 1e12:.2f} TFLOP, counted)", flush=True)
    state = io.BytesIO()  # plain bytes to the workers: no tensor sharing through file descriptors
    torch.save({k: v.detach().cpu() for k, v in base_mae.state_dict().items()}, state)
    state = state.getvalue()
    jobs = [{"stage": stage, "plan": plan, "seed": seed, "out": out, "threads": threads, "base_state": state,
             "steps": steps, "progress": progress and processes == 1}
            for stage, steps in (("tec", plan.tec_steps), ("mae_continued", match["mae_steps"]))]
    if processes == 1:
        if while_training is not None:
            while_training()
        results = {job["stage"]: _run_stage(job) for job in jobs}
    else:
        pool = multiprocessing.get_context("spawn").Pool(processes)
        try:
            pending = [pool.apply_async(_run_stage, (job,)) for job in jobs]
            bar = _StageProgress(out, {job["stage"]: job["steps"] for job in jobs}, progress)
            if while_training is not None:
                while_training()
            while True:
                waiting = [r for r in pending if not r.ready()]
                if not waiting or any(r.ready() and not r.successful() for r in pending):
                    break  # all done, or one stage failed: get() below raises its error
                bar.update()
                waiting[0].wait(1.0)  # an unfinished one: a finished one would return at once
            results = {r["stage"]: r for r in (p.get() for p in pending)}
            bar.update(final=True)
            pool.close()
        finally:
            pool.terminate()  # a failed stage or Ctrl-C stops the other one too
            pool.join()
    tec, mae = load_trained(plan, results["tec"]["checkpoint"], results["mae_continued"]["checkpoint"])
    return tec, mae, results, match


def tec_encoder(tec: TECModel) -> BaseModel:
    """The TEC model's encoder (input adapter folded into the CLS token) as a frozen ``BaseModel``."""
    encoder = BaseModel(vit_preset(DEMO_MODEL, DEMO_IMG))
    encoder.load_checkpoint(export_timm(tec))
    return encoder


def _evaluate_rows(encoders: Dict[str, BaseModel], train_ds, test_ds, arrays=None) -> Dict[str, dict]:
    """k-NN and linear probe of each encoder (and of raw pixels, given the demo ``arrays``)."""
    results = {} if arrays is None else {"pixels": pixel_baseline(*arrays)}
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


def run_demo(args, on_locked: Optional[Callable[[str], None]] = None) -> int:
    """The demo into ``args.output`` (default runs/demo), under the folder's run lock;
    ``on_locked(folder)`` runs once the lock is held (the train command writes its config.yaml
    there: a refused run leaves the running one's file alone)."""
    out = args.output or os.path.join("runs", "demo")
    with hold_output_lock(out):
        if on_locked is not None:
            on_locked(out)
        return _run_demo(args, out)


def _run_demo(args, out: str) -> int:
    plan, seed, progress = plan_for(args), args.seed, not args.no_progress
    t_all = time.perf_counter()
    print(f"TEC demo ({plan.mode}, seed {seed}): an existing MAE base -> TEC vs. MAE continued for the "
          f"same FLOPs -> k-NN / linear probe. Output: {out}")
    train_ds, test_ds = demo_datasets(BASE_RECIPE.data_seed, plan.n_train, plan.n_test)
    train_indexed = IndexedDataset(train_ds)
    base_dir = getattr(args, "demo_base", None)
    base_mae, base_meta = _base(plan, out, progress, train_ds, test_ds, base_dir)
    print(f"base: {base_meta['recipe']['steps']} MAE steps, k-NN {100 * base_meta['eval'].get('knn', float('nan')):.1f} "
          f"/ linear {100 * base_meta['eval'].get('linear', float('nan')):.1f} when made")

    processes, threads = stage_layout()
    torch.set_num_threads(threads)  # the evaluation here too: the machine's core count fixes every number
    results = {}

    def evaluate_fixed_rows():
        print("\n== evaluation of the fixed rows while the stages train: k-NN (cosine, k=20) and linear "
              "probe on frozen, mean-pooled features", flush=True)
        torch.manual_seed(seed + 2)
        fixed = {"random_init": BaseModel(vit_preset(DEMO_MODEL, DEMO_IMG)), "base": encoder_of(base_mae)}
        results.update(_evaluate_rows(fixed, train_ds, test_ds,
                                      demo_arrays(BASE_RECIPE.data_seed, plan.n_train, plan.n_test)))

    tec, mae, stages, match = train_stages(base_mae, train_indexed, plan, out, seed, progress,
                                           (processes, threads), evaluate_fixed_rows)
    print("\n== evaluation of the trained rows", flush=True)
    results.update(_evaluate_rows({"mae_continued": encoder_of(mae), "tec": tec_encoder(tec)}, train_ds, test_ds))
    _report(out, plan, seed, results, stages, match, base_meta, time.perf_counter() - t_all, processes)
    return 0


def _report(out: str, plan: DemoPlan, seed: int, results: dict, stages: dict, match: dict,
            base_meta: dict, seconds: float, processes: int) -> None:
    gain = {ref: {m: results["tec"][m] - results[ref][m] for m in ("knn", "linear")}
            for ref in ("base", "mae_continued")}
    steps = {name: r["steps"] for name, r in stages.items()}
    what = dict(ROWS, base="the MAE base this run trained first (--demo-from-scratch)") if plan.make_base else ROWS
    rows = [[name, f"{100 * results[name]['knn']:.1f}", f"{100 * results[name]['linear']:.1f}",
             what[name] + (f" ({steps[name]} steps)" if name in steps else "")] for name in ROWS]
    print("\n" + table(["row", "k-NN %", "linear %", "what the row is"], rows, align="lrrl",
                       title=f"demo results ({plan.mode}, seed {seed}; test split)"))
    for ref, g in gain.items():
        beat = all(v > 0 for v in g.values())
        print(f"TEC {'beats' if beat else 'does NOT beat'} {ref}: k-NN {100 * g['knn']:+.1f}, "
              f"linear probe {100 * g['linear']:+.1f} points")
    curves = {name: r["losses"] for name, r in stages.items()}
    plot = write_plot(os.path.join(out, "results.png"), {n: results[n] for n in ROWS}, curves,
                      f"TEC demo, seed {seed}")
    print(f"plot: {plot}" if plot else "plot: not written (matplotlib is missing: pip install 'tec_fast[demo]' "
                                       "or pip install matplotlib)")
    doc = {**results, "tec_minus_base": gain["base"], "tec_minus_mae_continued": gain["mae_continued"],
           "seed": seed, "mode": plan.mode, "rows": what, "steps": steps, "compute_match": match,
           "plan": plan.to_dict(), "base_record": base_meta, "seconds": round(seconds, 1),
           "losses": curves, "plot": plot,
           "stage_seconds": {name: round(r["seconds"], 1) for name, r in stages.items()},
           "machine": {"threads": torch.get_num_threads(), "stage_processes": processes,
                       "cores": os.cpu_count(), "platform": platform.platform(),
                       "torch": str(torch.__version__)}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"total {format_duration(seconds)}; results in {os.path.join(out, 'results.json')}")


def make_demo_base(args) -> int:
    """``--demo-make-base``: train the demo base by ``BASE_RECIPE`` and write it to ``--output``."""
    out = args.output or os.path.join("runs", "demo_base")
    with hold_output_lock(out):
        return _make_demo_base(args, out)


def _make_demo_base(args, out: str) -> int:
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
