"""A short end-to-end fine-tune: a linear classifier on the mean-pooled final features and every
encoder weight trained together (AdamW, layer-wise constant lr, warmup + cosine), then top-1 on the
test split. The third metric of ``benchmarks/repro.py``: it shows whether a representation is a
good *starting point*, which frozen-feature probes do not."""
from __future__ import annotations

import copy
import math
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F


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
