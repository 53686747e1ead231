"""The short end-to-end fine-tune of ``benchmarks/experiments/repro.py``: it trains the encoder too (the
original is untouched), and it learns a separable task far above chance."""
from __future__ import annotations

import torch

from tec_fast import BaseModel, ViTConfig
from tec_fast.evaluation.finetune import finetune_accuracy


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.3
    x[y == 1, 0] += 1.5  # class 1: a bright red channel
    return torch.utils.data.TensorDataset(x, y)


def test_finetune_learns_and_leaves_the_encoder_untouched():
    torch.manual_seed(0)
    enc = BaseModel(ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    acc = finetune_accuracy(enc, _data(256, 0), _data(128, 1), epochs=2, batch_size=32, lr=3e-3)["finetune"]
    assert acc > 0.9, acc
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
