"""One process of the native-resolution DDP test, launched by torchrun from test_native_train.py
(not a test itself). argv: OUT_JSON IMAGE_FOLDER SHARD ACCUM. Rank 0 writes the per-step global
losses and a checksum of the final weights to OUT_JSON."""
from __future__ import annotations

import json
import sys

import torch

from tec_fast.engine import cleanup_distributed, setup_distributed
from test_native_train import _fit


def main() -> None:
    out, folder, shard, accum = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    d = setup_distributed("cpu")
    r = _fit(folder, None, cfg={"accum": accum, "shard": shard})
    if shard == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(r.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = r.model.state_dict()
    if d.is_main:
        with open(out, "w") as f:
            json.dump({"world": d.world, "losses": r.losses, "images_per_step": r.global_batch,
                       "weights": {k: float(v.double().sum()) for k, v in state.items()}}, f)
    cleanup_distributed()


if __name__ == "__main__":
    main()
