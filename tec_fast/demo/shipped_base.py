"""The demo's base model: an MAE ViT trained on the demo data by ``--demo-make-base`` and shipped
inside the package (``assets/demo_base.pth``, fp16, encoder and MAE decoder, so the MAE-continued
row can keep training it), with ``assets/demo_base.json``: its recipe, steps, seed, the demo
data's fingerprint, how long it took and the k-NN / linear probe it reaches.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from tec_fast.checkpoint import save_atomic
from tec_fast.data.demo import demo_arrays
from tec_fast.demo.recipe import BASE_RECIPE, DEMO_IMG, DEMO_MODEL, BaseRecipe
from tec_fast.models.base import BaseModel
from tec_fast.models.mae import MAEModel
from tec_fast.presets import vit_preset

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS, META = "demo_base.pth", "demo_base.json"


def data_fingerprint(seed: int = 0) -> str:
    """sha256 (first 16 hex digits) of the demo arrays of ``seed``: images and labels, both splits."""
    h = hashlib.sha256()
    for array in demo_arrays(seed):
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def new_mae(recipe: BaseRecipe = BASE_RECIPE) -> MAEModel:
    return MAEModel(vit_preset(DEMO_MODEL, DEMO_IMG), recipe.decoder_dim, recipe.decoder_depth,
                    recipe.decoder_heads)


def encoder_of(mae: MAEModel, last_layers: int = 2, topk: Optional[int] = None) -> BaseModel:
    """The MAE model's encoder as a frozen ``BaseModel`` (targets, or features to evaluate)."""
    base = BaseModel(vit_preset(DEMO_MODEL, DEMO_IMG), last_layers=last_layers, topk=topk)
    base.load_checkpoint({"model": mae.encoder_state_dict()})
    return base


def save_base(mae: MAEModel, meta: dict, folder: str) -> Tuple[str, str]:
    """Write ``demo_base.pth`` (fp16 weights) and ``demo_base.json`` into ``folder``."""
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu()
             for k, v in mae.state_dict().items()}
    weights = os.path.join(folder, WEIGHTS)
    save_atomic({"model": state, "recipe": meta["recipe"]}, weights)
    path = os.path.join(folder, META)
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)
    return weights, path


def load_base(folder: Optional[str] = None) -> Tuple[MAEModel, dict]:
    """The base MAE model (fp32, from its fp16 file) and its record; ``folder`` defaults to the
    copy shipped in the package."""
    folder = Path(folder) if folder else ASSETS
    weights, meta_path = folder / WEIGHTS, folder / META
    if not weights.is_file() or not meta_path.is_file():
        raise ValueError(f"no demo base in {folder} ({WEIGHTS} and {META}): make one with "
                         "`python -m tec_fast.train --demo-make-base --output DIR`, or run the demo "
                         "with --demo-from-scratch")
    try:
        meta = json.loads(meta_path.read_text())
        recipe = BaseRecipe(**meta["recipe"])
        meta.setdefault("eval", {})
    except (ValueError, TypeError, KeyError) as exc:  # bad JSON, no "recipe", unknown fields
        raise ValueError(f"{meta_path}: not a demo base record ({type(exc).__name__}: {exc})") from None
    mae = new_mae(recipe)
    try:
        ck = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v.float() for k, v in ck["model"].items()}
    except Exception as exc:  # torch.load raises many types on a file that is not a checkpoint
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{weights}: not a readable demo base checkpoint ({type(exc).__name__}: {first})") from None
    missing, unexpected = mae.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed")]  # fixed sin-cos, recomputed
    if missing or unexpected:
        raise ValueError(f"{weights}: keys do not match the demo MAE model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return mae, meta


def train_base(recipe: BaseRecipe, output: str, progress: bool,
               evaluate: Callable[[BaseModel], dict]) -> Tuple[MAEModel, dict]:
    """MAE pretraining of the demo base by ``recipe`` (fixed steps, deterministic given the seed),
    then its evaluation from the fp16 copy it is shipped as. Returns the model and its record."""
    from tec_fast.data.demo import demo_datasets
    from tec_fast.training import FitConfig, fit
    from tec_fast.training.objectives import IndexedDataset, MAEObjective

    train_ds, _ = demo_datasets(recipe.data_seed)
    torch.manual_seed(recipe.seed)
    mae = new_mae(recipe)
    cfg = FitConfig(name="demo_base", output_dir=os.path.join(output, "base_run"), max_steps=recipe.steps,
                    batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                    precision="fp32", seed=recipe.seed, log_every=max(1, recipe.steps // 50),
                    save_every_epochs=10 ** 6, save_every_steps=500, keep_last=1, progress=progress,
                    resume="auto")
    t0 = time.perf_counter()
    result = fit(mae, MAEObjective(recipe.mask_ratio, mae.config.num_patches), IndexedDataset(train_ds),
                 cfg, checkpoint_extra={"kind": "mae", "model_config": mae.config_dict()})
    seconds = time.perf_counter() - t0
    meta = {"recipe": recipe.to_dict(), "model": DEMO_MODEL, "img_size": DEMO_IMG,
            "steps_done": result.steps, "train_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "data_fingerprint": data_fingerprint(recipe.data_seed),
            "losses": [round(v, 5) for v in result.losses[:: max(1, len(result.losses) // 200)]],
            "command": "python -m tec_fast.train --demo-make-base --output DIR"}
    shipped = new_mae(recipe)  # evaluate exactly what is shipped: the weights rounded to fp16
    shipped.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in mae.state_dict().items()})
    meta["eval"] = evaluate(encoder_of(shipped))
    save_base(mae, meta, output)
    return shipped, meta
