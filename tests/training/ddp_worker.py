"""One process of the DDP / FSDP test, launched by torchrun from test_ddp.py (not a test itself).

argv: OUT_JSON SHARD BATCH_PER_PROCESS ACCUM. Trains the tiny TEC model with fit() and rank 0
writes the per-step global losses and a checksum of the final weights to OUT_JSON."""
from __future__ import annotations

import sys

import torch

from tec_fast.training import FitConfig, cleanup_distributed, fit, setup_distributed
from train_helpers import AugmentedImages, tiny_objective, tiny_tec, write_rank0_summary


def main() -> None:
    out, shard, batch, accum = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    d = setup_distributed("cpu")
    cfg = FitConfig(name="ddp", epochs=2, batch_size=batch, accum=accum, lr=2e-3, warmup_steps=2,
                    seed=3, shard=shard, progress=False, log_every=1)
    r = fit(tiny_tec(), tiny_objective(), AugmentedImages(n=32), cfg)
    write_rank0_summary(d, r, shard, out)
    cleanup_distributed(barrier=True)


if __name__ == "__main__":
    main()
