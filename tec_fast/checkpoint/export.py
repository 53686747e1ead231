"""Export of an encoder (the new model's, or any base model's) for other code: a timm ViT state
dict (``global_pool='token'`` or ``'avg'``), written as ``.pth`` or ``.safetensors``, or a Hugging
Face ``ViTModel`` folder that ``ViTModel.from_pretrained`` loads. Every export refuses weights
that are not finite, naming the first bad key."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from tec_fast.checkpoint.formats import fold_cls_mlp
from tec_fast.checkpoint.io import save_atomic, write_safetensors
from tec_fast.config import ViTConfig

_ENCODER_KEY = re.compile(r"^(patch_embed\.|cls_token$|reg_token$|pos_embed$|norm_pre\.|blocks\.|norm\.)")
_GLOBAL_POOLS = ("token", "avg")
# ViTConfig.mlp_act -> Hugging Face hidden_act
_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}

StateOrModel = Union[nn.Module, Dict[str, torch.Tensor]]


def check_finite(state: Dict[str, torch.Tensor], what: str = "export") -> None:
    """ValueError naming the first tensor with a NaN or infinite value (and how many it has)."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = ~torch.isfinite(value)
            if bad.any():
                raise ValueError(f"{what}: weight {key!r} {tuple(value.shape)} has {int(bad.sum())} non-finite "
                                 f"values (NaN/inf); refusing to write a broken model")


def _encoder_state(model: StateOrModel) -> Dict[str, torch.Tensor]:
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    check_finite(state)
    if "cls_token_mlp.fc1.weight" in state:
        state = fold_cls_mlp(state)
    return {k: v for k, v in state.items() if _ENCODER_KEY.match(k)}


def export_timm(model: StateOrModel, global_pool: str = "token") -> Dict[str, torch.Tensor]:
    """The encoder as a timm ViT state dict (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``blocks.{i}``, ``norm``), with MLP(cls) folded into ``cls_token``. Loads with strict=True
    into timm's ``vit_*`` (num_classes=0) and into ``BaseModel`` for the next round of TEC.
    ``global_pool='avg'``: the final LayerNorm is named ``fc_norm`` (timm's and MAE's fine-tuning
    layout, ``vit_*(global_pool='avg')``: mean of the patch tokens, then ``fc_norm``)."""
    if global_pool not in _GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}")
    state = _encoder_state(model)
    if global_pool == "avg":
        state = {("fc_" + k if k.startswith("norm.") else k): v for k, v in state.items()}
    return state


def save_export(state: Dict[str, torch.Tensor], path: Union[str, os.PathLike]) -> str:
    """Write an exported state dict: ``.safetensors`` as safetensors, anything else with
    torch.save (atomically, both). Returns the format written."""
    check_finite(state)
    if os.fspath(path).endswith(".safetensors"):
        write_safetensors({k: v.contiguous() for k, v in state.items()}, path)
        return "safetensors"
    save_atomic(state, path)
    return "torch"


def export_hf_vit(model: StateOrModel, out_dir: Union[str, os.PathLike],
                  vit: Optional[ViTConfig] = None) -> Dict[str, torch.Tensor]:
    """The encoder as a Hugging Face transformers ``ViTModel`` folder (``config.json`` and
    ``model.safetensors``); ``ViTModel.from_pretrained(out_dir)`` loads it (its pooler, which no
    encoder has, stays freshly initialised). ``vit``: the architecture (default: the model's
    ``config.encoder`` or ``config``). Returns the HF state dict written."""
    if vit is None:
        cfg = getattr(model, "config", None)
        vit = getattr(cfg, "encoder", cfg)
    if not isinstance(vit, ViTConfig):
        raise ValueError("export_hf_vit needs vit=ViTConfig(...) for a bare state dict")
    odd = [name for name, ok in (("layer_scale", not vit.layer_scale), ("reg_tokens", not vit.reg_tokens),
                                 ("no_embed_class", not vit.no_embed_class), ("pre_norm", not vit.pre_norm),
                                 ("patch_bias", vit.patch_bias), ("class_token", vit.class_token)) if not ok]
    if odd:
        raise ValueError(f"Hugging Face ViTModel has no equivalent of ViTConfig {', '.join(odd)}; "
                         "export this encoder with export_timm")
    state = export_timm(model)
    C = vit.embed_dim
    if tuple(state["patch_embed.proj.weight"].shape[:2]) != (C, vit.in_chans) or "norm.weight" not in state:
        raise ValueError(f"export_hf_vit: the weights (patch_embed.proj.weight "
                         f"{tuple(state['patch_embed.proj.weight'].shape)}, norm present: "
                         f"{'norm.weight' in state}) do not match ViTConfig embed_dim={C}")
    hf = {"embeddings.cls_token": state.pop("cls_token"),
          "embeddings.position_embeddings": state.pop("pos_embed"),
          "embeddings.patch_embeddings.projection.weight": state.pop("patch_embed.proj.weight"),
          "embeddings.patch_embeddings.projection.bias": state.pop("patch_embed.proj.bias"),
          "layernorm.weight": state.pop("norm.weight"), "layernorm.bias": state.pop("norm.bias")}
    names = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
             "mlp.fc2": "output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after"}
    for i in range(vit.depth):
        pre, out = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = state.pop(f"{pre}attn.qkv.{kind}", None)
            if qkv is not None:
                for part, t in zip(("query", "key", "value"), qkv.chunk(3, dim=0)):
                    hf[f"{out}attention.attention.{part}.{kind}"] = t.contiguous()
            for ours, theirs in names.items():
                hf[f"{out}{theirs}.{kind}"] = state.pop(f"{pre}{ours}.{kind}")
    if state:
        raise ValueError(f"export_hf_vit: weights with no Hugging Face ViT name: {sorted(state)[:10]}")
    config = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": C,
              "num_hidden_layers": vit.depth, "num_attention_heads": vit.num_heads,
              "intermediate_size": vit.mlp_hidden, "hidden_act": _HF_ACT[vit.mlp_act],
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
              "layer_norm_eps": vit.ln_eps, "image_size": vit.img_size, "patch_size": vit.patch_size,
              "num_channels": vit.in_chans, "qkv_bias": vit.qkv_bias, "encoder_stride": vit.patch_size,
              "torch_dtype": "float32"}
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(hf, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return hf
