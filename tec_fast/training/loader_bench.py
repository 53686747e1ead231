"""``--bench-loader``: the data loader alone (decode + augmentation + collation, no model).

Besides images/s of the process, it reads each worker's CPU time from ``/proc`` (Linux), so the
throughput of one worker *per core* is measured even on a machine shared with other work, and
says how many workers (one core each) keep up with a step rate: ``--target-img-s``, or by default
the newest committed step result for this GPU class in ``benchmarks/results/*.jsonl``.
"""
from __future__ import annotations

import glob
import math
import os
import re
import time
from typing import Callable, List, Optional

import torch
from torch.utils.data import Dataset

from tec_fast.training.config import FitConfig
from tec_fast.training.distributed import setup_distributed
from tec_fast.training.loop import _to_device, batch_images, build_loader
from tec_fast.training.monitor import read_jsonl


def _cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def batch_bytes(batch) -> int:
    """Bytes of the tensors in a batch (what crossed the worker -> main process boundary)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, (list, tuple)):
        return sum(batch_bytes(b) for b in batch)
    if isinstance(batch, dict):
        return sum(batch_bytes(v) for v in batch.values())
    if hasattr(batch, "items") and isinstance(batch.items, list):  # an EncodedBatch
        return sum(batch_bytes(list(it)) if isinstance(it, tuple) else batch_bytes(it) for it in batch.items)
    return 0


def bench_loader(dataset: Dataset, cfg: FitConfig, seconds: float = 20.0, max_batches: int = 200,
                 batch_sampler=None, collate_fn: Optional[Callable] = None, device=None) -> dict:
    """Images/s of this process after the first batch (worker start-up excluded), the workers'
    images per CPU-second (``img_per_cpu_s``, None without ``/proc`` or workers) and the bytes per
    image the workers sent. ``device``: also move each batch there (a GPU decode runs there)."""
    d = setup_distributed()
    loader, sampler, _ = build_loader(dataset, cfg, d, batch_sampler=batch_sampler, collate_fn=collate_fn)
    sampler.set_epoch(0)
    batches = iter(loader)
    t0 = time.perf_counter()
    first_batch = next(batches)
    first = time.perf_counter() - t0
    sent = batch_bytes(first_batch) / max(1, batch_images(first_batch))
    workers = [w.pid for w in getattr(batches, "_workers", [])]
    pids = workers or [os.getpid()]
    cpu0 = [_cpu_seconds(p) for p in pids]
    main0 = time.process_time()
    n, t1, epoch = 0, time.perf_counter(), 0
    for _ in range(max_batches):
        try:
            batch = next(batches)
        except StopIteration:  # a small set: go on into the next epoch (the same worker processes)
            epoch += 1
            sampler.set_epoch(epoch)
            batches = iter(loader)
            batch = next(batches)
        if device is not None:
            moved = _to_device(batch, device)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            del moved
        n += batch_images(batch)
        if time.perf_counter() - t1 > seconds:
            break
    dt = time.perf_counter() - t1
    cpu1 = [_cpu_seconds(p) for p in pids]
    main_cpu = time.process_time() - main0
    if all(c is not None for c in cpu0 + cpu1):
        cpu = sum(b - a for a, b in zip(cpu0, cpu1)) if workers else main_cpu
    else:
        cpu = None
    del batches
    return {"img_per_s": n / dt if dt > 0 else float("nan"), "images": n, "seconds": dt,
            "first_batch_s": first, "num_workers": cfg.num_workers, "batch_size": cfg.batch_size,
            "worker_cpu_s": cpu, "main_cpu_s": main_cpu,
            "img_per_cpu_s": n / cpu if cpu else None, "bytes_per_image": sent}


# ------------------------------------------------------------------------ the step's rate
def results_dir() -> Optional[str]:
    """``benchmarks/results`` of the source checkout this package runs from, if there is one."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "benchmarks", "results")
    return path if os.path.isdir(path) else None


def device_class(device) -> Optional[str]:
    """The device name as the result files spell it (``NVIDIA_H200``); None for a CPU."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device).replace(" ", "_")


def newest_step_result(device_name: Optional[str], folder: Optional[str] = None) -> Optional[dict]:
    """The step rate to feed: among ``bench == "step"`` rows (of ``device_name``, or of any GPU
    when None), those of the newest timestamp, the fastest of them. None when there are none."""
    folder = folder or results_dir()
    if folder is None:
        return None
    rows: List[dict] = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        for r in read_jsonl(path):
            if r.get("bench") == "step" and isinstance(r.get("img_per_s"), (int, float)) and \
                    (device_name is None or r.get("device") == device_name):
                rows.append(dict(r, file=os.path.basename(path)))
    if not rows:
        return None
    newest = max(r.get("timestamp", "") for r in rows)
    return max((r for r in rows if r.get("timestamp", "") == newest), key=lambda r: r["img_per_s"])


def workers_needed(target_img_s: float, per_worker_img_s: Optional[float]) -> Optional[int]:
    if not per_worker_img_s or per_worker_img_s <= 0:
        return None
    return max(1, math.ceil(target_img_s / per_worker_img_s))


def loader_report(r: dict, target_img_s: Optional[float], device, img_size: Optional[int] = None) -> dict:
    """``bench_loader``'s result with the step rate to feed (``target_img_s``, or the newest
    committed step result for ``device``'s class: any GPU's for a CPU) and the workers it needs;
    ``target_source`` says where the rate came from, and that it is of another image size than
    the loader's ``img_size`` where it is (both rates depend on it).
    Adds ``per_worker_img_s`` (images per worker CPU-second when measured, else the process's
    img/s per worker), ``target_img_s``, ``target_source``, ``workers_needed``."""
    workers = max(1, r["num_workers"])
    per_worker = r["img_per_cpu_s"] if r.get("img_per_cpu_s") else r["img_per_s"] / workers
    source = "--target-img-s"
    if target_img_s is None:
        row = newest_step_result(device_class(device))
        if row is not None:
            target_img_s = float(row["img_per_s"])
            source = (f"{row['file']}: {row.get('device')} {row.get('provider')} {row.get('preset')} "
                      f"{row.get('shape')} {row.get('dtype')} at {row.get('commit')} ({row.get('timestamp')})")
            size = re.search(r"\bS=(\d+)", str(row.get("shape")))
            if img_size is not None and size and int(size.group(1)) != img_size:
                source += (f"; a step on {size.group(1)} px images, the loader measured on {img_size} px "
                           f"(give --target-img-s for this size)")
        else:
            source = "none found (give --target-img-s)"
    return dict(r, per_worker_img_s=per_worker, target_img_s=target_img_s, target_source=source,
                workers_needed=workers_needed(target_img_s, per_worker) if target_img_s else None)
