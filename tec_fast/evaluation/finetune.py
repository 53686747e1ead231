"""Fine-tuning a pretrained encoder end to end.

- ``FinetuneModel`` / ``layer_decay_optimizer``: MAE's fine-tuning recipe (``main_finetune.py``)
  for the ``finetune`` protocol of ``python -m tec_fast.eval``: global average pooling of the
  patch tokens + a new LayerNorm (the encoder's final norm dropped), a linear head initialised at
  std 2e-5, stochastic depth rising linearly to ``drop_path`` over the blocks, AdamW (0.9, 0.999)
  with layer-wise lr decay (block i scaled by decay^(depth + 1 - (i + 1)), the embeddings by
  decay^(depth + 1)), no weight decay on 1-D parameters and tokens. Mixup / cutmix / RandAugment
  are in ``augment``; the loop is ``tec_fast.training.fit``.
- ``finetune_accuracy``: a short fine-tune (a linear classifier on the mean-pooled final features
  and every encoder weight trained together, AdamW, constant lr across layers, warmup + cosine),
  then top-1 on the test split: the third metric of ``benchmarks/experiments/repro.py``."""
from __future__ import annotations

import copy
import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth of a residual branch [B, ...]: each sample's branch kept with probability
    1 - rate and scaled by 1 / (1 - rate)."""
    keep = 1.0 - rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep
    return x * mask.to(x.dtype) / keep


class FinetuneModel(nn.Module):
    """A trainable copy of ``encoder`` (a ``BaseModel``; the original is untouched) with a new head.
    ``global_pool``: mean of the patch tokens + a new LayerNorm (MAE's default), else the CLS token
    after the encoder's final norm. Stochastic depth acts on each block's two residual branches
    (the outputs of its ``ls1`` / ``ls2`` modules, by forward hooks: the block code stays as is)."""

    def __init__(self, encoder: nn.Module, num_classes: int, drop_path: float = 0.1, global_pool: bool = True,
                 init_std: float = 2e-5):
        super().__init__()
        enc = copy.deepcopy(encoder).requires_grad_(True)
        dim = enc.config.embed_dim
        self.global_pool = global_pool
        if global_pool:
            enc.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(dim, eps=enc.config.ln_eps)
        self.encoder = enc
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=init_std)  # MAE's (timm's): cut at +-2, not at 2 std
        nn.init.zeros_(self.head.bias)
        depth = len(enc.blocks)
        self.drop_rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        for block, rate in zip(enc.blocks, self.drop_rates):
            if rate > 0:
                for branch in (block.ls1, block.ls2):
                    branch.register_forward_hook(self._drop_hook(rate))

    def _drop_hook(self, rate: float):
        def hook(module, inputs, output):
            return drop_path(output, rate) if self.training else output
        return hook

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.global_pool:
            return self.head(self.fc_norm(self.encoder.pooled_features(images, "mean")))
        return self.head(self.encoder.pooled_features(images, "cls"))


_FIRST_LAYER = ("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre")
_NO_DECAY = ("cls_token", "reg_token", "pos_embed")


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for what follows the blocks."""
    name = name[len("encoder."):] if name.startswith("encoder.") else name
    if name.startswith(_FIRST_LAYER):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: FinetuneModel, weight_decay: float, layer_decay: float):
    """AdamW parameter groups, one per (layer, decayed or not), each with its ``lr_scale``."""
    depth = len(model.encoder.blocks)
    groups: Dict[Tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name[len("encoder."):] if name.startswith("encoder.") else name
        decay = not (p.ndim == 1 or short in _NO_DECAY)
        lid = layer_id(name, depth)
        g = groups.setdefault((lid, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                             "lr_scale": layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def layer_decay_optimizer(weight_decay: float = 0.05, layer_decay: float = 0.65,
                          betas: Tuple[float, float] = (0.9, 0.999)):
    """``fit``'s ``make_optimizer``: AdamW over ``layer_decay_groups``."""
    def make(model: nn.Module, lr: float):
        groups = layer_decay_groups(model, weight_decay, layer_decay)
        what = f"AdamW {betas}, layer decay {layer_decay}"
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True), what + " (fused)"
        except (RuntimeError, ValueError, TypeError):  # fused unsupported for this device / dtype
            return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True), what
    return make


class _Classifier(nn.Module):
    def __init__(self, encoder, num_classes: int):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).requires_grad_(True)
        self.head = nn.Linear(encoder.config.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.pooled_features(images))


def finetune_accuracy(encoder, train_ds, test_ds, epochs: int = 3, batch_size: int = 128,
                      lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0) -> Dict[str, float]:
    """Fine-tune a copy of ``encoder`` (a ``BaseModel``; the original is untouched) with a new
    linear head on ``train_ds`` (``(image, label)``), return {'finetune': test top-1}."""
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"finetune_accuracy: epochs, batch_size must be >= 1 and lr > 0, got "
                         f"{epochs}, {batch_size}, {lr}")
    labels = torch.as_tensor([int(train_ds[i][1]) for i in range(len(train_ds))])
    model = _Classifier(encoder, int(labels.max()) + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen,
                                         drop_last=True)
    total, warmup, step = epochs * len(loader), max(1, len(loader) // 2), 0
    for _ in range(epochs):
        for images, y in loader:
            scale = (step + 1) / warmup if step < warmup else \
                0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            loss = F.cross_entropy(model(images), torch.as_tensor(y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return {"finetune": _accuracy(model, test_ds, batch_size)}


@torch.no_grad()
def _accuracy(model: nn.Module, dataset, batch_size: int) -> float:
    correct = n = 0
    for images, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += int((model(images).argmax(1) == torch.as_tensor(y)).sum())
        n += len(y)
    return correct / max(1, n)
