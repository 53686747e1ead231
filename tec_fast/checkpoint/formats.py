"""Checkpoint layouts: which weights inside a file belong to which model (MAE, iBOT, DINO, timm,
TEC released and raw TEC checkpoints, the engine's own).

Every loader names what it could not match (a ``LoadReport`` and one warning) and refuses a
checkpoint whose shapes contradict the configured architecture, naming the key and both shapes.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn

from tec_fast.checkpoint.infer import count_blocks
from tec_fast.checkpoint.io import PathOrState, read_checkpoint

# Keys a base model does not need: classification heads, MAE/TEC decoders, TEC adapters.
_BASE_IGNORED = re.compile(r"^(head\.|head_dist\.|fc_norm\.|decoder_|mask_token|encoder_adaptor\.|"
                           r"forward_fea_decoder\.|forward_att_decoder\.|decoder_blocks\.|"
                           r"decoder_pos_embed|pre_logits\.)")
_PREFIXES = ("module.", "backbone.", "_orig_mod.")


@dataclass
class LoadReport:
    """What a loader did: ``loaded`` keys, ``ignored`` (known, not needed), ``unexpected``
    (unknown), ``missing`` (model keys the checkpoint lacked), ``notes`` (layout decisions)."""

    source: str = ""
    loaded: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for name in ("ignored", "unexpected", "missing"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{name}: {shown}")
        parts += self.notes
        return "; ".join(parts)


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _pick_state(obj: dict, prefer_teacher: bool, report: LoadReport) -> Dict[str, torch.Tensor]:
    """Find the weights inside a checkpoint dict (plain, `model`, `state_dict`, `teacher`)."""
    if _is_state_dict(obj):
        return obj
    order = ("teacher", "model", "state_dict", "model_ema") if prefer_teacher \
        else ("model", "state_dict", "teacher", "model_ema")
    for key in order:
        if key in obj and _is_state_dict(obj[key]):
            if key == "teacher" and "student" in obj:
                report.notes.append("used 'teacher' weights (what iBOT/DINO evaluate), not 'student'")
            return obj[key]
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    raise ValueError("checkpoint holds no state dict: expected a dict of tensors or one under "
                     f"'model', 'state_dict' or 'teacher'; top-level keys: {sorted(obj)[:12]}"
                     + (f" (tensor keys: {tensors[:5]})" if tensors else ""))


def _assign(model: nn.Module, state: Dict[str, torch.Tensor], report: LoadReport,
            optional_missing: re.Pattern = None) -> None:
    """Copy matching tensors into ``model``; refuse on any shape contradiction."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)} but the configured "
                             f"model expects {tuple(own[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(own[key].dtype))
                report.loaded.append(key)
    report.missing = [k for k in own if k not in state
                      and not (optional_missing is not None and optional_missing.match(k))]


def read_state_dict(src: PathOrState, prefer_teacher: bool = True) -> Dict[str, torch.Tensor]:
    """The weights inside any supported checkpoint, prefixes stripped (no model needed)."""
    return _strip_prefixes(_pick_state(read_checkpoint(src), prefer_teacher, LoadReport()))


# ---------------------------------------------------------------------------- base model
def fold_cls_mlp(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Replace ``cls_token`` by MLP(cls_token) using ``cls_token_mlp.fc1/fc2`` (GELU between),
    dropping the MLP keys: what a timm ViT (and a base model) sees as its CLS token."""
    state = dict(state)
    w1, b1 = state.pop("cls_token_mlp.fc1.weight"), state.pop("cls_token_mlp.fc1.bias")
    w2, b2 = state.pop("cls_token_mlp.fc2.weight"), state.pop("cls_token_mlp.fc2.bias")
    cls = state["cls_token"].float()
    h = torch.nn.functional.gelu(cls @ w1.float().t() + b1.float())
    state["cls_token"] = (h @ w2.float().t() + b2.float()).to(state["cls_token"].dtype)
    return state


def load_base_checkpoint(base: nn.Module, src: PathOrState) -> LoadReport:
    """Load MAE / iBOT / DINO / timm / TEC-released / raw TEC weights into a ``BaseModel``."""
    report = LoadReport(source=src if isinstance(src, str) else os.fspath(src)
                        if isinstance(src, os.PathLike) else "<dict>")
    state = _strip_prefixes(_pick_state(read_checkpoint(src), prefer_teacher=True, report=report))
    if "cls_token_mlp.fc1.weight" in state:
        state = fold_cls_mlp(state)
        report.notes.append("folded the TEC input adapter (cls_token_mlp) into cls_token")
    depth, found = base.config.depth, count_blocks(state)
    if found and found != depth:
        raise ValueError(f"checkpoint has {found} encoder blocks (blocks.0..{found - 1}) but the "
                         f"configured base model has depth={depth}")
    kept = {}
    own = base.state_dict()
    for key, value in state.items():
        if key in own:
            kept[key] = value
        elif _BASE_IGNORED.match(key):
            report.ignored.append(key)
        else:
            report.unexpected.append(key)
    if not kept:
        raise ValueError(f"checkpoint {report.source} matches no base-model key; its keys start with "
                         f"{sorted(state)[:8]}")
    # `norm.*` is not used for the targets and TEC's released encoders ship without it.
    _assign(base, kept, report, optional_missing=re.compile(r"^norm\."))
    if report.missing:
        raise ValueError(f"checkpoint {report.source} lacks base-model keys: {report.missing[:10]}")
    if report.unexpected or report.ignored:
        warnings.warn(f"BaseModel.load_checkpoint: {report.summary()}", stacklevel=3)
    return report


# ------------------------------------------------------------------------------ TEC model
def load_tec_checkpoint(model: nn.Module, src: PathOrState) -> LoadReport:
    """Load the official TEC pretraining layout (``checkpoint-N.pth``) or the engine's own into a
    ``TECModel``. Names are the same in both; fixed position embeddings are recomputed, not
    required."""
    report = LoadReport(source=src if isinstance(src, str) else os.fspath(src)
                        if isinstance(src, os.PathLike) else "<dict>")
    obj = read_checkpoint(src)
    state = _strip_prefixes(_pick_state(obj, prefer_teacher=False, report=report))
    depth, found = model.config.encoder.depth, count_blocks(state)
    if found and found != depth:
        raise ValueError(f"checkpoint has {found} encoder blocks but the configured model has depth={depth}")
    dfound = count_blocks(state, "decoder_blocks.")
    if dfound and dfound != model.config.decoder_depth:
        raise ValueError(f"checkpoint has {dfound} decoder blocks but TECConfig.decoder_depth="
                         f"{model.config.decoder_depth}")
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own}
    report.unexpected = [k for k in state if k not in own]
    if not kept:
        raise ValueError(f"checkpoint {report.source} matches no TEC-model key; its keys start with "
                         f"{sorted(state)[:8]}")
    _assign(model, kept, report, optional_missing=re.compile(r"^(pos_embed|decoder_pos_embed)$"))
    if report.missing:
        raise ValueError(f"checkpoint {report.source} lacks TEC-model keys: {report.missing[:10]}"
                         + (f" ({len(report.missing)} in all)" if len(report.missing) > 10 else ""))
    if report.unexpected:
        warnings.warn(f"TECModel.load_checkpoint: {report.summary()}", stacklevel=3)
    return report


