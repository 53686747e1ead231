"""The one place that reads an architecture out of a checkpoint: block counts, a ViT config
stored beside the weights, or one inferred from tensor shapes, and a TECConfig for raw TEC weights."""
from __future__ import annotations

import math
import re
from typing import Dict, Optional, Tuple

import torch

from tec_fast.config import TECConfig
from tec_fast.presets import MODEL_PRESETS

_VIT_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def count_blocks(state: Dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    """Number of transformer blocks in a state dict (1 + the highest ``{prefix}{i}.`` index)."""
    ids = {int(m.group(1)) for k in state for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0



def stored_vit(obj) -> Optional[dict]:
    """A ViT config saved inside a checkpoint: any nested dict (or argparse Namespace) holding
    img_size/patch_size/embed_dim/depth/num_heads, searched under 'config', 'vit', 'args'."""
    def search(node, depth):
        if hasattr(node, "__dict__") and not isinstance(node, (dict, torch.Tensor)):
            node = vars(node)
        if not isinstance(node, dict) or depth > 3:
            return None
        if all(k in node for k in _VIT_FIELDS):
            return {k: node[k] for k in (*_VIT_FIELDS, "mlp_ratio", "in_chans") if k in node}
        for key in ("vit", "encoder", "config", "args", "model_config"):
            if key in node:
                found = search(node[key], depth + 1)
                if found:
                    return found
        return None

    for key in ("config", "vit", "args", "model_config"):
        if isinstance(obj, dict) and key in obj:
            found = search(obj[key], 0)
            if found:
                return found
    return None


def infer_vit(state: dict) -> Tuple[dict, str]:
    """Architecture from tensor shapes; returns (fields, note on what was guessed)."""
    w = state.get("patch_embed.proj.weight")
    if w is None or w.dim() != 4:
        raise ValueError("cannot infer the architecture: no patch_embed.proj.weight in the checkpoint; "
                         "pass --model or --embed-dim/--depth/--num-heads/--patch-size")
    C, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = count_blocks(state)
    fields = {"patch_size": patch, "embed_dim": C, "depth": depth, "in_chans": in_chans}
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        fields["mlp_ratio"] = fc1.shape[0] / C
    pos = state.get("pos_embed")
    if pos is not None:
        grid = math.isqrt(pos.shape[-2] - 1)
        fields["img_size"] = grid * patch
    preset = [name for name, (p, d, n, _) in MODEL_PRESETS.items() if (p, d, n) == (patch, C, depth)]
    if preset:
        fields["num_heads"] = MODEL_PRESETS[preset[0]][3]
        note = f"num_heads={fields['num_heads']} from preset {preset[0]} (not stored in weights)"
    else:
        fields["num_heads"] = max(1, C // 64)
        note = f"num_heads={fields['num_heads']} guessed as width/64 (not stored in weights; use --num-heads)"
    return fields, note


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


