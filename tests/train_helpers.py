"""Tiny models and data shared by the trainer tests (test_train / test_resume / test_faults /
test_ddp). Everything is small enough to run a step in milliseconds on one CPU thread."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast.training.objectives import TECObjective

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)


def tiny_vit() -> ViTConfig:
    return ViTConfig(**TINY_VIT)


def tiny_base(seed: int = 0) -> BaseModel:
    torch.manual_seed(seed)
    return BaseModel(tiny_vit(), last_layers=2, topk=3)


def tiny_tec(seed: int = 1) -> TECModel:
    torch.manual_seed(seed)
    return TECModel(TECConfig(encoder=tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=2, tau=1.0))


def tiny_objective(base=None) -> TECObjective:
    vit = tiny_vit()
    return TECObjective(base if base is not None else tiny_base(), 0.75, vit.num_patches)


class AugmentedImages(Dataset):
    """n fixed random images; each access adds random noise and a random flip drawn from torch's
    global RNG - a stand-in for RandomResizedCrop that makes augmentation reproducibility matter."""

    def __init__(self, n: int = 48, size: int = 16, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i] + 0.1 * torch.randn_like(self.images[i])
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, i % 10


def write_rank0_summary(d, result, shard: str, out: str, **extra) -> None:
    """DDP/FSDP test workers: rank 0 writes the per-step global losses and a checksum of the
    final (full, unsharded) weights to ``out`` as JSON."""
    import json

    if shard == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(result.model,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = result.model.state_dict()
    if d.is_main:
        with open(out, "w") as f:
            json.dump({"world": d.world, "losses": result.losses, **extra,
                       "weights": {k: float(v.double().sum()) for k, v in state.items()}}, f)
