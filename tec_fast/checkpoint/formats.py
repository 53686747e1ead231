"""Checkpoint layouts: which weights inside a file belong to which model (MAE, iBOT, DINO, timm,
TEC released and raw TEC checkpoints, the engine's own).

Every loader names what it could not match (a ``LoadReport`` and one warning) and refuses a
checkpoint whose shapes contradict the configured architecture, naming the key and both shapes.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from tec_fast.checkpoint.infer import count_blocks, stored_vit
from tec_fast.checkpoint.io import PathOrState, read_checkpoint
from tec_fast.checkpoint.resample import resample_pos_embed

# Keys a base model does not need: classification heads and poolers, MAE/TEC decoders, TEC
# adapters, mask tokens (HF ViT, DINOv2, MAE).
_BASE_IGNORED = re.compile(r"^(head\.|head_dist\.|fc_norm\.|decoder_|decoder\.|mask_token|encoder_adaptor\.|"
                           r"forward_fea_decoder\.|forward_att_decoder\.|decoder_blocks\.|"
                           r"decoder_pos_embed|pre_logits\.|pooler\.|classifier\.|attn_pool\.)")
# Keys on the path from the image to the features: one the base model does not have would make
# its targets silently wrong, so it is refused, never skipped.
_BASE_FEATURE_PATH = re.compile(r"^(blocks\.|patch_embed\.|norm_pre\.|cls_token|reg_token|register_tokens|"
                                r"dist_token|pos_embed|embeddings\.|encoder\.)")
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


def nonfinite_keys(state: dict) -> List[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.is_meta
            and not bool(torch.isfinite(v).all())]


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out, given = {}, {}
    for key, value in state.items():
        if not isinstance(key, str):  # a dict built by hand: prefixes and names are matched as text
            raise ValueError(f"checkpoint state dict key {key!r} is of type {type(key).__name__}, not a str "
                             f"(parameter names like 'blocks.0.attn.qkv.weight')")
        name, changed = key, True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        if name in out:  # one would silently replace the other
            raise ValueError(f"checkpoint keys {given[name]!r} and {key!r} both name {name!r} once the wrapper "
                             f"prefixes {', '.join(_PREFIXES)} are stripped: keep one of them")
        out[name], given[name] = value, key
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
    for where, d in [("", obj)] + [(f" under {key!r}", obj[key]) for key in order if isinstance(obj.get(key), dict)]:
        tensors = [k for k, v in d.items() if isinstance(v, torch.Tensor)]
        others = [k for k, v in d.items() if not isinstance(v, torch.Tensor)]
        if tensors and len(tensors) >= len(others):  # a state dict but for a stray entry: name it
            shown = ", ".join(f"{k!r}: {type(d[k]).__name__}" for k in others[:3])
            raise ValueError(f"checkpoint holds {len(tensors)} tensors{where} beside {len(others)} other "
                             f"value(s) ({shown}); a state dict holds tensors only: remove {others[0]!r}")
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    raise ValueError("checkpoint holds no state dict: expected a dict of tensors or one under "
                     f"'model', 'state_dict' or 'teacher'; top-level keys: {sorted(obj)[:12]}"
                     + (f" (tensor keys: {tensors[:5]})" if tensors else ""))


def _refuse_unloadable(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], source: str) -> None:
    """ValueError naming the key of a tensor that has no data (meta) or is not floating where the
    model's is (an int or bool would be cast as if it were a weight, a complex one lose its
    imaginary part)."""
    for key, value in state.items():
        if key not in own:
            continue
        if value.is_meta:
            raise ValueError(f"checkpoint {source}: key {key!r} is a meta tensor (a shape without data): "
                             f"load real weights")
        if own[key].is_floating_point() and not value.is_floating_point():
            raise ValueError(f"checkpoint {source}: key {key!r} holds {value.dtype} values where the model "
                             f"has a floating-point {own[key].dtype} tensor")


def _assign(model: nn.Module, state: Dict[str, torch.Tensor], report: LoadReport,
            optional_missing: re.Pattern = None) -> None:
    """Copy matching tensors into ``model``; refuse on any shape contradiction, and on a tensor
    the copy cannot read or would silently cast (``_refuse_unloadable``)."""
    own = model.state_dict()
    _refuse_unloadable(state, own, report.source)
    for key, value in state.items():
        if key not in own:
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"checkpoint {report.source}: key {key!r} has shape {tuple(value.shape)} but "
                             f"the configured model expects {tuple(own[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(own[key].dtype))
                report.loaded.append(key)
    report.missing = [k for k in own if k not in state
                      and not (optional_missing is not None and optional_missing.match(k))]


def read_state_dict(src: PathOrState, prefer_teacher: bool = True, trust: bool = False) -> Dict[str, torch.Tensor]:
    """The weights inside any supported checkpoint, prefixes stripped (no model needed)."""
    return _strip_prefixes(_pick_state(read_checkpoint(src, trust=trust), prefer_teacher, LoadReport()))


# ---------------------------------------------------------------------------- base model
def fold_cls_mlp(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Replace ``cls_token`` by MLP(cls_token) using ``cls_token_mlp.fc1/fc2`` (GELU between),
    dropping the MLP keys: what a timm ViT (and a base model) sees as its CLS token."""
    state = dict(state)
    for key in ("cls_token", "cls_token_mlp.fc1.weight", "cls_token_mlp.fc1.bias", "cls_token_mlp.fc2.weight",
                "cls_token_mlp.fc2.bias"):
        if key in state and not state[key].is_floating_point():  # .float() below would cast it silently
            raise ValueError(f"checkpoint key {key!r} holds {state[key].dtype} values, not floating-point weights")
    w1, b1 = state.pop("cls_token_mlp.fc1.weight"), state.pop("cls_token_mlp.fc1.bias")
    w2, b2 = state.pop("cls_token_mlp.fc2.weight"), state.pop("cls_token_mlp.fc2.bias")
    cls = state["cls_token"].float()
    h = torch.nn.functional.gelu(cls @ w1.float().t() + b1.float())
    state["cls_token"] = (h @ w2.float().t() + b2.float()).to(state["cls_token"].dtype)
    return state


# Files (save_pretrained, the hub) name layers ``encoder.layer.{i}`` with query/key/value;
# transformers 5's in-memory state dicts ``layers.{i}`` with q_proj/k_proj/v_proj/o_proj.
_HF_BLOCK = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)$")
_HF_BLOCK_NAMES = {"attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
                   "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1",
                   "mlp.fc2": "mlp.fc2", "layernorm_before": "norm1", "layernorm_after": "norm2"}
_QKV_PART = {"q": "query", "k": "key", "v": "value"}
_HF_TOP_NAMES = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
                 "embeddings.mask_token": "mask_token", "layernorm.weight": "norm.weight",
                 "layernorm.bias": "norm.bias",
                 "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                 "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias"}


def is_hf_vit(state: Dict[str, torch.Tensor]) -> bool:
    """A Hugging Face transformers ViTModel / ViTMAEModel state dict (after prefix stripping),
    in the file naming (transformers 4 and 5 ``save_pretrained``) or transformers 5's module naming."""
    return "embeddings.patch_embeddings.projection.weight" in state


def hf_vit_to_timm(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Hugging Face ``ViTModel`` / ``ViTMAEModel`` names -> timm names; query/key/value are
    concatenated into ``attn.qkv``. Names it does not know keep their place (``blocks.{i}.<rest>``
    for per-layer ones), so the loader can refuse them by name."""
    out, qkv = {}, {}
    for key, value in state.items():
        m = _HF_BLOCK.match(key)
        if m is None:
            out[_HF_TOP_NAMES.get(key, key)] = value
            continue
        i, rest = m.group(1), m.group(2)
        qkv_m = _HF_QKV.match(rest)
        if qkv_m:
            part = qkv_m.group(1) or _QKV_PART[qkv_m.group(2)]
            qkv.setdefault((i, qkv_m.group(3)), {})[part] = value
            continue
        for hf, timm in _HF_BLOCK_NAMES.items():
            if rest.startswith(hf + "."):
                rest = timm + rest[len(hf):]
                break
        out[f"blocks.{i}.{rest}"] = value
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"Hugging Face layer {i}: attention {kind} has only {sorted(parts)} of "
                             "query/key/value")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


def is_protocol_checkpoint(obj: dict) -> bool:
    """A checkpoint of ``eval --protocol linprobe / finetune``: its model is ``encoder.*`` and a
    classifier, and it records the encoder's config (``encoder_config``)."""
    return "protocol" in obj and isinstance(obj.get("encoder_config"), dict)


def protocol_encoder(obj: dict, state: Dict[str, torch.Tensor], report: LoadReport) -> Dict[str, torch.Tensor]:
    """The encoder weights of a protocol checkpoint's model (``state``) in timm names: ``encoder.*``
    with the prefix dropped, and a fine-tuned global pool's ``fc_norm.*`` (the final norm, which
    the fine-tuning moved out of the encoder); the classifier (``head``, ``bn``) goes to
    ``report.ignored``. The architecture is the recorded ``encoder_config`` (``infer.stored_vit``)."""
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError(f"checkpoint {report.source} records --protocol {obj['protocol']!r} but its model holds "
                         f"no encoder.* weights; its keys start with {sorted(state)[:8]} (damaged checkpoint?)")
    encoder.update((k, v) for k, v in state.items() if k.startswith("fc_norm."))
    report.ignored += [k for k in state if not k.startswith(("encoder.", "fc_norm."))]
    report.notes.append(f"the encoder (encoder.*) of an eval --protocol {obj['protocol']} checkpoint, with the "
                        f"encoder_config it records")
    return encoder


@dataclass
class BaseWeights:
    """A base model's weights read from any supported source, in timm names: ``state``;
    ``hf_config`` (a Hugging Face config.json, else {}); ``stored`` (a ViT config saved by the
    engine, else None); ``report`` (what the reading did)."""

    state: Dict[str, torch.Tensor]
    hf_config: dict
    stored: Optional[dict]
    report: LoadReport


def read_base_weights(src: Union[PathOrState, BaseWeights], trust: bool = False,
                      source: Optional[str] = None) -> BaseWeights:
    """Read a base checkpoint and bring it to timm's layout: teacher / model / state_dict picked,
    ``module.`` / ``backbone.`` / ``_orig_mod.`` stripped; Hugging Face names mapped; DINOv2's
    ``register_tokens`` turned into timm's no-embed-class layout (the CLS position folded into
    ``cls_token``, as timm's converter does); a distilled DeiT's ``dist_token`` a register token;
    a raw TEC checkpoint's ``cls_token_mlp`` folded; an ``eval --protocol`` checkpoint's encoder
    taken out of its classifier (``protocol_encoder``). ``source``: the name errors and the report
    give ``src`` (default: its path, or ``<dict>``; a caller that read the file itself passes the path)."""
    if isinstance(src, BaseWeights):
        return src
    report = LoadReport(source=source if source is not None else
                        os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<dict>")
    obj = read_checkpoint(src, trust=trust)
    state = _strip_prefixes(_pick_state(obj, prefer_teacher=True, report=report))
    if is_protocol_checkpoint(obj):
        state = protocol_encoder(obj, state, report)
    hf_config = obj.get("hf_config") or {}
    if any(k.startswith("vit.embeddings.") for k in state):  # ViTForImageClassification, ViTMAEForPreTraining
        state = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in state.items()}
    if is_hf_vit(state):
        state = hf_vit_to_timm(state)
        report.notes.append("mapped Hugging Face ViT names to timm's")
        if not hf_config:
            hf_config = {"layer_norm_eps": 1e-12, "hidden_act": "gelu"}
            report.notes.append("no config.json: Hugging Face ViT defaults assumed (layer_norm_eps 1e-12, GELU)")
    if "register_tokens" in state:
        state = dict(state)
        pos = state.pop("pos_embed")
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
        report.notes.append("DINOv2 registers: CLS position folded into cls_token, pos_embed covers the patches")
    if "dist_token" in state:
        if "reg_token" in state:
            raise ValueError("checkpoint has both dist_token and reg_token; the engine models one kind of "
                             "extra prefix token")
        state = dict(state)
        state["reg_token"] = state.pop("dist_token")
        report.notes.append("distilled DeiT: dist_token used as a register token (its head is ignored)")
    if "cls_token_mlp.fc1.weight" in state:
        state = fold_cls_mlp(state)
        report.notes.append("folded the TEC input adapter (cls_token_mlp) into cls_token")
    if "fc_norm.weight" in state and not any(k.startswith("norm.") for k in state):
        # timm's global_pool='avg' layout (our export_timm(global_pool='avg') too): the final
        # LayerNorm is named fc_norm and norm is absent; it is the final norm the features use.
        state = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in state.items()}
        report.notes.append("fc_norm.* (timm global_pool='avg' layout, no norm.*) loaded as the final norm, "
                            "applied to each token before pooling (timm applies it to the pooled mean)")
    return BaseWeights(state, hf_config, stored_vit(obj, report.source), report)


def base_nonfinite_keys(state: Dict[str, torch.Tensor]) -> List[str]:
    """``nonfinite_keys`` of the weights (timm names) a base model would load: not the heads,
    decoders and adapters it ignores."""
    return nonfinite_keys({k: v for k, v in state.items() if not _BASE_IGNORED.match(k)})


def _fit_pos_embed(base: nn.Module, pos: torch.Tensor, report: LoadReport) -> torch.Tensor:
    """The stored position embedding, resampled to the base model's grid where it differs."""
    cfg = base.config
    want = tuple(base.pos_embed.shape)
    if tuple(pos.shape) == want:
        return pos
    prefix = cfg.pos_embed_len - cfg.num_patches
    rows = pos.shape[1] - prefix if pos.dim() == 3 else -1
    g = math.isqrt(rows) if rows > 0 else 0
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != want[2] or g * g != rows:
        raise ValueError(f"checkpoint key 'pos_embed' has shape {tuple(pos.shape)} but the configured "
                         f"model expects {want} ({prefix} prefix rows + a {cfg.grid_size}x{cfg.grid_size} "
                         f"grid); a stored table must be {prefix} prefix rows + a square grid of "
                         f"width {want[2]} to be resampled")
    report.notes.append(f"pos_embed resampled from a {g}x{g} to a {cfg.grid_size}x{cfg.grid_size} grid "
                        "(bicubic, antialias, prefix rows kept)")
    return resample_pos_embed(pos, (cfg.grid_size, cfg.grid_size), (g, g), num_prefix=prefix)


def _unsupported_hint(keys: List[str]) -> str:
    hints = []
    if any(".ls1." in k or ".ls2." in k for k in keys):
        hints.append("LayerScale: ViTConfig(layer_scale=True)")
    if any(k.startswith(("reg_token", "register_tokens", "dist_token")) for k in keys):
        hints.append("register tokens: ViTConfig(reg_tokens=R)")
    if any(k.startswith("norm_pre.") for k in keys):
        hints.append("pre-norm: ViTConfig(pre_norm=True)")
    if any(k.endswith("bias") for k in keys):
        hints.append("biases: ViTConfig(patch_bias=..., qkv_bias=...)")
    return ("; " + ", ".join(hints)) if hints else ""


def load_base_checkpoint(base: nn.Module, src: Union[PathOrState, BaseWeights],
                         trust: bool = False) -> LoadReport:
    """Load MAE / iBOT / DINO / DeiT / DINOv2 / CLIP / timm / Hugging Face / TEC-released /
    raw TEC weights into a ``BaseModel``. Weights on the path to the features that the model does
    not have (LayerScale, registers, anything unmatched in a block, ...) are refused by name; a
    position embedding of another grid is resampled to the model's."""
    weights = read_base_weights(src, trust=trust)
    report, state = weights.report, weights.state
    depth, found = base.config.depth, count_blocks(state)
    if found and found != depth:
        raise ValueError(f"checkpoint has {found} encoder blocks (blocks.0..{found - 1}) but the "
                         f"configured base model has depth={depth}")
    kept, refused = {}, []
    own = base.state_dict()
    for key, value in state.items():
        if key in own:
            kept[key] = value
        elif _BASE_IGNORED.match(key):
            report.ignored.append(key)
        elif _BASE_FEATURE_PATH.match(key):
            refused.append(key)
        else:
            report.unexpected.append(key)
    if refused:
        raise ValueError(f"checkpoint {report.source} has weights the configured base model does not have "
                         f"(its features would be wrong without them): {refused[:10]}"
                         + (f" ({len(refused)} in all)" if len(refused) > 10 else "")
                         + _unsupported_hint(refused)
                         + "; BaseModel.from_checkpoint reads the architecture from the weights")
    if not kept:
        raise ValueError(f"checkpoint {report.source} matches no base-model key; its keys start with "
                         f"{sorted(state)[:8]}")
    _refuse_unloadable(kept, own, report.source)  # before the position embedding is resampled
    bad = nonfinite_keys(kept)
    if bad:
        raise ValueError(f"checkpoint {report.source}: {len(bad)} weights hold NaN or inf values "
                         f"({', '.join(bad[:3])}); targets and features from them would be meaningless")
    if "pos_embed" in kept:
        kept["pos_embed"] = _fit_pos_embed(base, kept["pos_embed"], report)
    # `norm.*` is not used for the targets and TEC's released encoders ship without it.
    _assign(base, kept, report, optional_missing=re.compile(r"^norm\."))
    if "norm.weight" not in kept:
        report.notes.append("no final norm in the checkpoint (norm.* / fc_norm.*): the model's LayerNorm "
                            "keeps its own weights (unit scale, zero shift when new), which only evaluation "
                            "features (encode) use")
    if report.missing:
        raise ValueError(f"checkpoint {report.source} lacks base-model keys: {report.missing[:10]}")
    if report.unexpected or report.ignored:
        warnings.warn(f"BaseModel.load_checkpoint: {report.summary()}", stacklevel=3)
    return report


# ------------------------------------------------------------------------------ TEC model
def load_tec_checkpoint(model: nn.Module, src: PathOrState, trust: bool = False,
                        source: Optional[str] = None) -> LoadReport:
    """Load the official TEC pretraining layout (``checkpoint-N.pth``) or the engine's own into a
    ``TECModel``. Names are the same in both; the fixed sin-cos position embeddings are the
    model's own (built for its grid), so stored ones are not required, and ones stored for
    another image size are skipped. ``source``: the name errors and the report give ``src``
    (default: its path, or ``<dict>``; a caller that read the file itself passes the path)."""
    report = LoadReport(source=source if source is not None else
                        os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<dict>")
    obj = read_checkpoint(src, trust=trust)
    state = _strip_prefixes(_pick_state(obj, prefer_teacher=False, report=report))
    depth, found = model.config.encoder.depth, count_blocks(state)
    if found and found != depth:
        raise ValueError(f"checkpoint {report.source} has {found} encoder blocks but the configured model has "
                         f"depth={depth}")
    dfound = count_blocks(state, "decoder_blocks.")
    if dfound and dfound != model.config.decoder_depth:
        raise ValueError(f"checkpoint {report.source} has {dfound} decoder blocks but TECConfig.decoder_depth="
                         f"{model.config.decoder_depth}")
    own = model.state_dict()
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in state and key in own and state[key].shape != own[key].shape:
            state = {k: v for k, v in state.items() if k != key}
            report.notes.append(f"{key} of another grid skipped: the model's sin-cos table is built for "
                                f"img_size={model.config.encoder.img_size}")
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


