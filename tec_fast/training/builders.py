"""From the train command's settings to what ``fit`` runs: one builder per objective, looked up
in ``OBJECTIVE_BUILDERS`` (a new objective is one builder and one row), plus the native-resolution
plan. ``flags`` is the parsed ``python -m tec_fast.train`` namespace (already validated)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from tec_fast.config import ViTConfig
from tec_fast.presets import MODEL_PRESETS, parse_base, vit_preset
from tec_fast.training.objectives import Objective


@dataclass
class TrainingSetup:
    """Everything that differs between objectives, as ``fit`` and the command need it."""
    model: nn.Module
    objective: Objective
    dataset: Dataset                          # what fit iterates (the images, or a view of them)
    collate_fn: Optional[Callable]
    checkpoint_extra: dict                    # plain data stored in every checkpoint
    encoder_file: str                         # the exported encoder's file name in the output folder
    encoder_state: Callable[[nn.Module], dict]  # the trained model's encoder in a loadable layout


# ------------------------------------------------------------------------------ the base
_BASE_WEIGHTS: dict = {}  # (path, size, mtime, trust) -> BaseWeights: read once for checks and build


def _base_weights(path: str, trust: bool, keep: bool):
    """``--base``'s weights, read once: the flag checks read them (``keep``), ``build_tec`` takes
    them (and the cache lets them go)."""
    from tec_fast.checkpoint import read_base_weights

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, trust)
    weights = _BASE_WEIGHTS.pop(key, None)
    if weights is None:
        _BASE_WEIGHTS.clear()
        weights = read_base_weights(path, trust=trust)
    if keep:
        _BASE_WEIGHTS[key] = weights
    return weights


def _base_heads(flags) -> Optional[int]:
    """--base-heads, or --base-model's head count (the weights tell the rest); None: neither."""
    if getattr(flags, "base_heads", None):
        return flags.base_heads
    return MODEL_PRESETS[flags.base_model][3] if flags.base_model else None  # (patch, width, depth, heads)


def base_architecture(flags):
    """The ViTConfig ``build_tec`` builds the base with, read from the weights of ``--base``
    (width, depth, patch, LayerScale, registers, ...) at ``--img-size``, heads from ``--base-model``
    where given. ValueError naming the flag: --img-size off the weights' patch grid, a
    --base-model the weights contradict (patch, width, depth) or whose heads do not divide their
    width, weights that do not read or hold NaN or inf."""
    from tec_fast.checkpoint import base_nonfinite_keys, infer_base_vit

    _, path, _ = parse_base(flags.base)
    try:
        weights = _base_weights(path, getattr(flags, "trust_checkpoint", False), keep=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"--base {path!r} does not read as a base checkpoint: {exc}") from None
    bad = base_nonfinite_keys(weights.state)
    if bad:
        raise ValueError(f"--base {path}: {len(bad)} weights hold NaN or inf values ({', '.join(bad[:3])}); "
                         f"targets from them would be meaningless")
    fields = dict(img_size=None, num_heads=_base_heads(flags))
    if flags.base_model:  # patch, width and depth first: a preset of another size is refused for those
        try:
            _check_named_base(flags, path, infer_base_vit(weights.state, hf_config=weights.hf_config,
                                                          stored=weights.stored, img_size=None)[0])
        except ValueError as exc:
            if str(exc).startswith("--base-model"):
                raise
    try:
        vit, _, heads_from = infer_base_vit(weights.state, hf_config=weights.hf_config, stored=weights.stored,
                                            **fields)
    except ValueError as exc:
        if fields["num_heads"] is not None and "num_heads" in str(exc):
            named = (f"--base-heads {flags.base_heads}" if getattr(flags, "base_heads", None)
                     else f"--base-model {flags.base_model}'s {fields['num_heads']}")
            raise ValueError(f"{named} heads do not fit the weights of {path}: {exc}") from None
        raise ValueError(f"--base {path}: {exc}") from None
    if heads_from == "guessed":
        warnings.warn(f"--base {path}: its weights (width {vit.embed_dim}) are of no preset's size and store no "
                      f"head count; assuming {vit.num_heads} head{'s' if vit.num_heads != 1 else ''} (width/64). The relation targets have a row "
                      f"per head: give --base-heads N where the base was trained with another count",
                      stacklevel=2)
    if flags.base_model:
        _check_named_base(flags, path, vit)
    if flags.img_size % vit.patch_size:
        raise ValueError(f"--img-size {flags.img_size} is not a multiple of the base's patch size "
                         f"{vit.patch_size} (read from {path})")
    return ViTConfig(**{**vit.to_dict(), "img_size": flags.img_size})


def _check_named_base(flags, path: str, vit) -> None:
    """--base-model names the architecture (only its head count is used), so its patch, width
    and depth must be those of the weights: a ValueError naming the flag and what differs."""
    held = {"patch_size": vit.patch_size, "embed_dim": vit.embed_dim, "depth": vit.depth}
    named = dict(zip(held, MODEL_PRESETS[flags.base_model][:3]))
    if named != held:
        match = [n for n, (p, d, k, _) in MODEL_PRESETS.items() if (p, d, k) == tuple(held.values())]
        fix = f"use --base-model {match[0]}" if match else "leave --base-model out"
        raise ValueError(f"--base-model {flags.base_model} has "
                         f"{', '.join(f'{k}={v}' for k, v in named.items() if held[k] != v)} but the weights "
                         f"of {path} hold {', '.join(f'{k}={v}' for k, v in held.items() if named[k] != v)}; "
                         f"{fix} (the architecture is read from the weights)")


# ------------------------------------------------------------------------------ native plan
def native_plan(flags, base_vit=None) -> dict:
    """Patch size and budgets of ``--native-resolution`` (the patch: ``--model``'s, else the
    base's, ``base_vit`` or read by ``base_architecture``). ValueError naming the flag when the
    budget cannot hold one image."""
    from tec_fast.models.masking import num_visible

    _, _, recipe = parse_base(flags.base)
    vit = vit_preset(flags.model, flags.img_size) if flags.model else (base_vit or base_architecture(flags))
    topk = None if flags.no_relation else (flags.topk if flags.topk is not None else recipe.topk)
    # every image needs >= topk patches (relation targets), >= 2 (per-image target variance),
    # and at least one visible patch at the mask ratio
    min_patches = max(topk or 0, 2)
    while num_visible(min_patches, flags.mask_ratio) < 1:
        min_patches += 1
    max_patches = flags.max_patches if flags.max_patches is not None else vit.num_patches
    if max_patches < min_patches:
        raise ValueError(f"--max-patches {max_patches} is below the {min_patches} patches an image "
                         f"needs here (top-k {topk}, mask ratio {flags.mask_ratio})")
    tokens = flags.tokens_per_batch if flags.tokens_per_batch is not None else flags.batch_size * (max_patches + 1)
    if tokens < max_patches + 1:
        raise ValueError(f"--tokens-per-batch {tokens} cannot hold one image of --max-patches "
                         f"{max_patches} (+1 CLS token)")
    return {"patch": vit.patch_size, "max_patches": max_patches, "min_patches": min_patches,
            "tokens_per_batch": tokens}


def native_batching(dataset, native: dict, seed: int) -> dict:
    """``fit`` keywords for native resolution: the global per-epoch plan of token-budget bins
    (``NativeBatchSampler``: seeded shuffle, ``packing.plan_bins``, seeded bin order)."""
    from tec_fast.models.native import NativeBatchSampler

    p = native["patch"]
    sizes = [(h * p, w * p) for h, w in dataset.native_grids()]  # exact grids: no further rounding
    return {"batch_sampler": NativeBatchSampler(sizes, p, native["max_patches"], native["tokens_per_batch"],
                                                shuffle=True, seed=seed)}


# --------------------------------------------------------------------------------- builders
def build_mae(flags, dataset: Dataset, device: torch.device, native: Optional[dict]) -> TrainingSetup:
    """MAE pretraining of a first base model; its encoder is saved in the MAE release layout,
    which ``--base mae_vit_*:PATH`` reads."""
    from tec_fast.models.mae import MAEModel
    from tec_fast.training.objectives import MAEObjective

    vit = vit_preset(flags.model or "vit_base_patch16", flags.img_size)
    depth = flags.decoder_depth if flags.decoder_depth is not None else 8
    model = MAEModel(vit, flags.decoder_dim, depth, flags.decoder_heads)
    return TrainingSetup(model, MAEObjective(flags.mask_ratio, vit.num_patches), dataset, None,
                         {"kind": "mae", "args": vars(flags), "model_config": model.config_dict()},
                         "encoder_mae.pth", lambda m: {"model": m.encoder_state_dict()})


def build_tec(flags, dataset: Dataset, device: torch.device, native: Optional[dict]) -> TrainingSetup:
    """TEC from the frozen ``--base`` with its recipe's defaults; the new encoder is exported as
    a timm ViT state dict. ``native`` (from ``native_plan``): the packed native-resolution model."""
    from tec_fast.checkpoint import export_timm
    from tec_fast.config import TECConfig
    from tec_fast.models.base import BaseModel

    kind, path, recipe = parse_base(flags.base)
    last_layers = flags.last_layers if flags.last_layers is not None else recipe.last_layers
    topk = None if flags.no_relation else (flags.topk if flags.topk is not None else recipe.topk)
    tau = flags.tau if flags.tau is not None else recipe.tau
    # The base's architecture comes from its weights (LayerScale, registers, patch 14, ...), its
    # position embedding resampled to --img-size; --base-model only supplies the head count.
    trust = getattr(flags, "trust_checkpoint", False)
    base = BaseModel.from_checkpoint(_base_weights(path, trust, keep=False), img_size=flags.img_size,
                                     num_heads=_base_heads(flags), last_layers=last_layers, topk=topk, trust=trust)
    report = base.load_report
    base_vit = base.config
    vit = vit_preset(flags.model, flags.img_size) if flags.model else base_vit.plain()
    base.to(device)
    tec_cfg = TECConfig(encoder=vit, decoder_dim=flags.decoder_dim,
                        decoder_depth=flags.decoder_depth if flags.decoder_depth is not None else 2,
                        decoder_heads=flags.decoder_heads, input_adapter=not flags.no_input_adapter,
                        relation=not flags.no_relation, tau=tau, pred_dim=base_vit.embed_dim,
                        pred_heads=base_vit.num_heads)
    model, objective, data, collate = _tec_model(flags, tec_cfg, base, dataset, native)
    extra = {"kind": "tec", "args": vars(flags), "model_config": tec_cfg.to_dict(),
             "base": {"kind": kind, "path": path, "vit": base_vit.to_dict(), "last_layers": last_layers,
                      "topk": topk, "tau": tau, "load_report": report.summary()}}
    return TrainingSetup(model, objective, data, collate, extra, "encoder_timm.pth", export_timm)


def _tec_model(flags, tec_cfg, base, dataset: Dataset, native: Optional[dict]):
    """(model, objective, dataset, collate_fn): dense / variable-ratio / block masking, or packed
    native-resolution batches."""
    from tec_fast.training.objectives import TECObjective

    if native is not None:
        from tec_fast.models.native import NativeTECModel
        from tec_fast.training.objectives import NativeTECObjective
        objective = NativeTECObjective(base, flags.mask_ratio, native["patch"], native["tokens_per_batch"])
        return NativeTECModel(tec_cfg), objective, objective.samples(dataset), objective.collate
    from tec_fast.models.tec import TECModel
    if flags.compile:
        base = torch.compile(base)
    objective = TECObjective(base, flags.mask_ratio, tec_cfg.encoder.num_patches, masking=flags.masking)
    return TECModel(tec_cfg), objective, dataset, None


OBJECTIVE_BUILDERS: Dict[str, Callable[..., TrainingSetup]] = {"tec": build_tec, "mae": build_mae}
