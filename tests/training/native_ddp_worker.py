"""One process of the native-resolution DDP test, launched by torchrun from test_native_train.py
(not a test itself). argv: OUT_JSON IMAGE_FOLDER SHARD ACCUM. Rank 0 writes the per-step global
losses and a checksum of the final weights to OUT_JSON."""
from __future__ import annotations

import sys

import torch

from tec_fast.training import cleanup_distributed, setup_distributed
from test_native_train import _fit
from train_helpers import write_rank0_summary


def main() -> None:
    out, folder, shard, accum = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    d = setup_distributed("cpu")
    r = _fit(folder, None, cfg={"accum": accum, "shard": shard})
    write_rank0_summary(d, r, shard, out, images_per_step=r.global_batch)
    cleanup_distributed(barrier=True)


if __name__ == "__main__":
    main()
