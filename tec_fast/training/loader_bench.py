"""``--bench-loader``: the data loader alone, images per second."""
from __future__ import annotations

import time
from typing import Callable, Optional

from torch.utils.data import Dataset

from tec_fast.training.config import FitConfig
from tec_fast.training.distributed import setup_distributed
from tec_fast.training.loop import batch_images, build_loader


def bench_loader(dataset: Dataset, cfg: FitConfig, seconds: float = 20.0, max_batches: int = 200,
                 batch_sampler=None, collate_fn: Optional[Callable] = None) -> dict:
    """The data loader alone (decode + augmentation + collation, no model): images/s of this
    process after the first batch (worker start-up excluded)."""
    d = setup_distributed()
    loader, sampler, _ = build_loader(dataset, cfg, d, batch_sampler=batch_sampler, collate_fn=collate_fn)
    sampler.set_epoch(0)
    batches = iter(loader)
    t0 = time.perf_counter()
    next(batches)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for _ in range(max_batches):
        try:
            batch = next(batches)
        except StopIteration:
            break
        n += batch_images(batch)
        if time.perf_counter() - t1 > seconds:
            break
    dt = time.perf_counter() - t1
    return {"img_per_s": n / dt if dt > 0 else float("nan"), "images": n, "seconds": dt,
            "first_batch_s": first, "num_workers": cfg.num_workers, "batch_size": cfg.batch_size}
