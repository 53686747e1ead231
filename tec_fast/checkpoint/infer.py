"""The one place that reads an architecture out of a checkpoint: block counts, a ViT config
stored beside the weights, or one inferred from tensor shapes, and a TECConfig for raw TEC weights."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Optional, Tuple

import torch

from tec_fast.config import TECConfig, ViTConfig
from tec_fast.presets import MODEL_PRESETS

_VIT_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
_ALL_VIT_FIELDS = tuple(f.name for f in dataclasses.fields(ViTConfig))
# Hugging Face ``hidden_act`` -> ViTConfig.mlp_act
_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def count_blocks(state: Dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    """Number of transformer blocks in a state dict (1 + the highest ``{prefix}{i}.`` index)."""
    ids = {int(m.group(1)) for k in state for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def stored_vit(obj, source: str = "checkpoint") -> Optional[dict]:
    """A ViT config saved inside a checkpoint: any nested dict (or argparse Namespace) holding
    img_size/patch_size/embed_dim/depth/num_heads, searched under 'config', 'vit', 'args',
    'model_config', 'encoder_config' (an ``eval --protocol`` checkpoint's encoder).
    One whose values no ViTConfig takes (a record damaged by hand) is a ValueError naming
    ``source`` (the file) and where it is stored."""
    def search(node, depth, where):
        if hasattr(node, "__dict__") and not isinstance(node, (dict, torch.Tensor)):
            node = vars(node)
        if not isinstance(node, dict) or depth > 3:
            return None
        if all(k in node for k in _VIT_FIELDS):
            return {k: node[k] for k in _ALL_VIT_FIELDS if k in node}, where
        for key in ("vit", "encoder", "config", "args", "model_config"):
            if key in node:
                found = search(node[key], depth + 1, f"{where}.{key}")
                if found:
                    return found
        return None

    for key in ("config", "vit", "args", "model_config", "encoder_config"):
        if isinstance(obj, dict) and key in obj:
            found = search(obj[key], 0, key)
            if found:
                fields, where = found
                try:
                    ViTConfig.from_dict(fields)
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"{source}: the ViT config stored in its {where} is invalid ({exc}); "
                                     f"damaged checkpoint?") from None
                return fields
    return None


def _square(n: int) -> int:
    g = math.isqrt(n) if n > 0 else 0
    return g if g * g == n else 0


def infer_vit(state: dict, hf_config: Optional[dict] = None) -> Tuple[dict, str]:
    """Architecture from tensor shapes (timm names; see ``formats.read_base_weights``), and from
    a Hugging Face config.json where there is one; returns (ViTConfig fields, notes on what was
    guessed). Read from the weights: width, depth, patch, channels, MLP ratio, biases, LayerScale,
    pre-norm, CLS and register tokens, whether the position embedding covers them, its grid."""
    fields, notes, heads_note, _ = _read_vit(state, hf_config)
    return fields, "; ".join(notes + ([heads_note] if heads_note else []))


def _read_vit(state: dict, hf_config: Optional[dict]) -> Tuple[dict, List[str], str, str]:
    """``infer_vit``'s (fields, notes other than the head count's, the head count's note, where
    the head count came from: "config.json", "preset" or "guessed")."""
    hf = hf_config or {}
    w = state.get("patch_embed.proj.weight")
    if w is None or w.dim() != 4:
        raise ValueError("cannot infer the architecture: no patch_embed.proj.weight in the checkpoint; "
                         "pass --model or --embed-dim/--depth/--num-heads/--patch-size")
    if w.shape[2] != w.shape[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {tuple(w.shape)}: non-square patches are not supported")
    C, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = count_blocks(state)
    if depth == 0:
        raise ValueError("cannot infer the architecture: the checkpoint has no blocks.{i}.* weights")
    notes: List[str] = []
    fields = {"patch_size": patch, "embed_dim": C, "depth": depth, "in_chans": in_chans,
              "class_token": "cls_token" in state, "layer_scale": "blocks.0.ls1.gamma" in state,
              "pre_norm": "norm_pre.weight" in state, "patch_bias": "patch_embed.proj.bias" in state,
              "qkv_bias": "blocks.0.attn.qkv.bias" in state}
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        fields["mlp_ratio"] = fc1.shape[0] / C
    reg = state.get("reg_token")
    fields["reg_tokens"] = int(reg.shape[1]) if reg is not None else 0
    pos = state.get("pos_embed")
    if pos is not None:
        prefix = int(fields["class_token"]) + fields["reg_tokens"]
        with_prefix, patches_only = _square(pos.shape[-2] - prefix), _square(pos.shape[-2])
        if not with_prefix and not patches_only:
            raise ValueError(f"pos_embed has shape {tuple(pos.shape)}: neither {prefix} prefix rows + a square "
                             "grid nor a square grid (non-square grids are not supported)")
        # Both can hold only for tiny grids (9 rows: 5 prefix + 2x2, or 3x3): registers then mean
        # timm's DINOv2-reg layout, the one layout with registers outside the table.
        fields["no_embed_class"] = prefix > 0 and bool(patches_only) and (not with_prefix or fields["reg_tokens"] > 0)
        grid = patches_only if fields["no_embed_class"] else with_prefix
        fields["img_size"] = grid * patch
    elif "image_size" in hf:
        fields["img_size"] = int(hf["image_size"])
    if fields["pre_norm"]:
        fields["ln_eps"] = 1e-5
        notes.append("ln_eps=1e-5 assumed (pre-norm: a CLIP tower; not stored in weights)")
    if hf:
        fields["ln_eps"] = float(hf.get("layer_norm_eps", 1e-12))
        act = hf.get("hidden_act", "gelu")
        if act not in _HF_ACT:
            raise ValueError(f"Hugging Face config hidden_act={act!r} is not supported; one of {sorted(_HF_ACT)}")
        fields["mlp_act"] = _HF_ACT[act]
        if "num_attention_heads" in hf:
            fields["num_heads"] = int(hf["num_attention_heads"])
            return fields, notes, "", "config.json"
    preset = [name for name, (p, d, n, _) in MODEL_PRESETS.items() if (p, d, n) == (patch, C, depth)]
    if preset:
        fields["num_heads"] = MODEL_PRESETS[preset[0]][3]
        return fields, notes, f"num_heads={fields['num_heads']} from preset {preset[0]} (not stored in weights)", \
            "preset"
    heads = max(1, C // 64)
    while C % heads:
        heads -= 1
    fields["num_heads"] = heads
    return fields, notes, f"num_heads={heads} guessed as width/64 (not stored in weights; use --num-heads)", "guessed"


SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "mlp_ratio")


def weight_mismatches(vit_fields: dict, state: dict) -> List[Tuple[str, object, object]]:
    """(field, configured value, value the weights hold) for each of ``SHAPE_FIELDS`` in
    ``vit_fields`` that the weights ``state`` (timm names) contradict; [] where the architecture
    cannot be read from them. Lets a command name the flag that is wrong and the value that works."""
    try:
        read, _ = infer_vit(state)
    except ValueError:
        return []
    out = []
    for name in SHAPE_FIELDS:
        if name in vit_fields and name in read and vit_fields[name] != read[name]:
            out.append((name, vit_fields[name], read[name]))
    return out


def infer_base_vit(state: dict, hf_config: Optional[dict] = None, stored: Optional[dict] = None,
                   img_size: Optional[int] = None, num_heads: Optional[int] = None,
                   overrides: Optional[dict] = None) -> Tuple[ViTConfig, List[str], str]:
    """The base model's (ViTConfig, notes on what was assumed, where its head count came from)
    for ``BaseModel.from_checkpoint``: ``infer_vit`` on the weights; heads from ``num_heads``
    ("given"), else a config stored beside the weights ("stored"), else as ``infer_vit`` finds them
    ("config.json", "preset" or "guessed": width / 64); ``img_size`` (default: the stored position
    embedding's grid) sets the grid the position embedding is resampled to; ``overrides`` set
    fields the weights cannot tell."""
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"config_overrides must be a dict of ViTConfig fields to values (e.g. "
                         f"{{'ln_eps': 1e-5}}), got a {type(overrides).__name__}")
    fields, notes, heads_note, heads_from = _read_vit(state, hf_config)
    if num_heads is not None:
        fields["num_heads"], heads_from = num_heads, "given"
    elif stored and "num_heads" in stored:
        fields["num_heads"], heads_from = stored["num_heads"], "stored"
    elif heads_note:
        notes.append(heads_note)
    if stored:
        for key in ("ln_eps", "mlp_act"):
            if key in stored:
                fields[key] = stored[key]
    if img_size is not None:
        fields["img_size"] = img_size
    fields.setdefault("img_size", 224)
    for key, value in (overrides or {}).items():
        if key not in _ALL_VIT_FIELDS:
            raise ValueError(f"config_overrides: {key!r} is not a ViTConfig field ({', '.join(_ALL_VIT_FIELDS)})")
        fields[key] = value
    return ViTConfig(**fields), notes, heads_from


def infer_tec_config(state: Dict[str, torch.Tensor], vit):
    """A TECConfig matching the weights of an official checkpoint (head counts do not change
    any shape: 1 head per 64 channels is assumed where they cannot be read)."""
    dec_dim = state["forward_fea_decoder.decoder_embed.weight"].shape[0]
    pred_dim = state["forward_fea_decoder.decoder_pred.weight"].shape[0]
    heads = lambda dim: max(1, dim // 64) if dim % max(1, dim // 64) == 0 else 1  # noqa: E731
    return TECConfig(encoder=vit, decoder_dim=dec_dim, decoder_depth=count_blocks(state, "decoder_blocks."),
                     decoder_heads=heads(dec_dim), input_adapter="cls_token_mlp.fc1.weight" in state,
                     relation="forward_att_decoder.decoder_qk.weight" in state, tau=1.0,
                     pred_dim=pred_dim, pred_heads=heads(pred_dim),
                     num_adapters=count_blocks(state, "encoder_adaptor.fuse_fcs."))


