"""Sequence packing (tec_fast.packing) against plain baselines, in the same process.

- plan_bins on 20k sequences vs a plain-Python first-fit-decreasing (goal >= 20x, aim 100x),
  with the fill rate (tokens / (bins x capacity)) of both.
- pack vs torch boolean indexing + cumsum (goal >= 1x, aim 1.5x); the baseline is timed twice:
  `x[keep]` + cumsum + max (the plain-torch way to pack: the kept rows, the offsets, the longest
  sequence) and the same plus `nonzero` for the flat index that pack also returns.
- unpack vs torch (fill broadcast + boolean-mask assignment).

Prints the ratios and appends JSON lines to ``<results-dir>/<device>.jsonl``.

    python -m benchmarks.bench_packing                      # ViT-B/16 token grid, GPU if present
    python -m benchmarks.bench_packing --device cpu --threads 1
    python -m benchmarks.bench_packing --small --results-dir /tmp/r   # seconds; the test smoke run
"""
from __future__ import annotations

import argparse
import math
import os
import random
from typing import Dict, List

import torch


from benchmarks.common import (DTYPES, append_results, default_device, device_arg, device_name, format_table,
                               make_parser, results_dir, time_callable)
from tec_fast import packing
from tec_fast.cli.flags import NON_NEGATIVE, POSITIVE
from tec_fast.cli.flags import mask_ratio as _mask_ratio


def ratio_range(text: str) -> str:
    """--mask-ratio: one ratio or a range LO:HI, each in (0, 1) and LO <= HI; the text itself is
    kept (it labels the rows' shape)."""
    _mask_ratio(text)
    return text


def dtype_list(text: str) -> str:
    """--dtypes: comma-separated names from ``DTYPES``."""
    bad = [name for name in text.split(",") if name not in DTYPES]
    if bad or not text:
        raise argparse.ArgumentTypeError(f"expected comma-separated names from {','.join(DTYPES)}, got {text!r}")
    return text


def python_ffd(lengths: List[int], capacity: int) -> List[List[int]]:
    """The textbook first-fit-decreasing, plain Python: the baseline plan_bins must beat."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: List[List[int]] = []
    room: List[int] = []
    for i in order:
        for b, left in enumerate(room):
            if lengths[i] <= left:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def torch_pack(x: torch.Tensor, keep: torch.Tensor):
    packed = x[keep]  # [T, C]
    lengths = keep.sum(1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return packed, cu_seqlens, int(lengths.max())


def torch_pack_with_index(x: torch.Tensor, keep: torch.Tensor):
    return torch_pack(x, keep) + (keep.reshape(-1).nonzero().reshape(-1),)


def torch_unpack(packed: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor):
    out = fill.expand(*keep.shape, fill.shape[0]).clone()  # [B, L, C]
    out[keep] = packed
    return out


def main(argv=None) -> List[Dict]:
    p = make_parser("bench_packing", __doc__)
    p.add_argument("--device", type=device_arg, default=default_device(),
                   help="pack/unpack device: cpu, cuda or cuda:N (plan_bins always runs on the CPU; "
                        "default: cuda where there is one, else cpu)")
    p.add_argument("--batch", type=POSITIVE, default=64, help="images, B (default 64)")
    p.add_argument("--seq-len", type=POSITIVE, default=196, help="patches per image, L (default 196)")
    p.add_argument("--dim", type=POSITIVE, default=768, help="channels, C (default 768)")
    p.add_argument("--mask-ratio", type=ratio_range, default="0.6:0.9",
                   help="per-image ratio range LO:HI, or one value, in (0, 1) (default 0.6:0.9)")
    p.add_argument("--dtypes", type=dtype_list, default="fp32,bf16",
                   help=f"comma-separated, from {','.join(DTYPES)} (default fp32,bf16)")
    p.add_argument("--n-seqs", type=POSITIVE, default=20000, help="plan_bins sequences (default 20000)")
    p.add_argument("--capacity", type=POSITIVE, default=1024, help="plan_bins tokens per bin (default 1024)")
    p.add_argument("--min-len", type=POSITIVE, default=16, help="plan_bins shortest sequence (default 16)")
    p.add_argument("--max-len", type=POSITIVE, default=256,
                   help="plan_bins longest sequence, at most --capacity (default 256)")
    p.add_argument("--reps", type=POSITIVE, default=50, help="timed calls per provider (default 50)")
    p.add_argument("--threads", type=NON_NEGATIVE, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--small", action="store_true", help="tiny sizes and few reps (smoke test)")
    p.add_argument("--results-dir", type=results_dir,
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder the rows are appended to, as <device>.jsonl, plan_bins rows under the CPU's "
                        "name (made if missing; default benchmarks/results)")
    args = p.parse_args(argv)
    if args.small:
        args.batch, args.seq_len, args.dim, args.n_seqs, args.reps = 4, 16, 8, 300, 3
        args.capacity, args.min_len, args.max_len = 64, 1, 32
    if args.min_len > args.max_len:
        p.refuse("--min-len", f"{args.min_len} is above --max-len {args.max_len}")
    if args.max_len > args.capacity:
        p.refuse("--max-len", f"{args.max_len} is above --capacity {args.capacity}: a sequence must fit a bin")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = torch.device("cpu")
    extra = {"threads": torch.get_num_threads(), "backend": packing.backend(device)}
    print(f"device {device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"CPU threads, packing backend: {packing.backend(device)}")

    # plan_bins (CPU) ---------------------------------------------------------------------------
    rng = random.Random(0)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.n_seqs)]
    total = sum(lengths)
    ours = time_callable(lambda: packing.plan_bins(lengths, args.capacity), cpu, reps=args.reps)
    base = time_callable(lambda: python_ffd(lengths, args.capacity), cpu, warmup=0,
                         reps=max(1, min(5, args.reps)))
    n_ours = len(packing.plan_bins(lengths, args.capacity))
    n_ffd = len(python_ffd(lengths, args.capacity))
    lower = math.ceil(total / args.capacity)
    shape = f"n={args.n_seqs},len={args.min_len}..{args.max_len},capacity={args.capacity}"
    speed = base["median_ms"] / ours["median_ms"]
    plan_rows = [dict(bench="plan_bins", provider=provider, shape=shape, dtype="int64", **t,
                      speedup=sp, bins=nb, lower_bound_bins=lower,
                      fill_rate=total / (nb * args.capacity), device=device_name(cpu), **extra)
                 for provider, t, nb, sp in (("tec_fast.plan_bins", ours, n_ours, speed),
                                             ("python_ffd", base, n_ffd, 1.0))]
    print(f"plan_bins {shape}: {ours['median_ms']:.2f} ms vs python FFD {base['median_ms']:.1f} ms "
          f"-> {speed:.0f}x; bins {n_ours} (FFD {n_ffd}, lower bound {lower}); fill rate "
          f"{total / (n_ours * args.capacity):.4f} (FFD {total / (n_ffd * args.capacity):.4f})")

    # pack / unpack -----------------------------------------------------------------------------
    lo, _, hi = args.mask_ratio.partition(":")
    lo, hi = float(lo), float(hi or lo)
    gen = torch.Generator().manual_seed(0)
    B, L, C = args.batch, args.seq_len, args.dim
    ratio = lo + (hi - lo) * torch.rand(B, 1, generator=gen)  # per-image mask ratio
    keep = (torch.rand(B, L, generator=gen) >= ratio).to(device)  # [B, L]
    shape = f"B={B},L={L},C={C},mask={args.mask_ratio},T={int(keep.sum())}"
    rows: List[Dict] = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        x = torch.randn(B, L, C, generator=gen).to(device=device, dtype=dtype)
        packed, _, _, index = packing.pack(x, keep)
        fill = torch.zeros(C, dtype=dtype, device=device)
        providers = {
            "torch_bool_index+cumsum": ("pack", lambda: torch_pack(x, keep)),
            "torch_bool_index+cumsum+nonzero": ("pack", lambda: torch_pack_with_index(x, keep)),
            "tec_fast.pack": ("pack", lambda: packing.pack(x, keep)),
            "torch_unpack": ("unpack", lambda: torch_unpack(packed, keep, fill)),
            "tec_fast.unpack": ("unpack", lambda: packing.unpack(packed, index, fill, (B, L))),
        }
        t = {prov: time_callable(fn, device, reps=args.reps) for prov, (_, fn) in providers.items()}
        ms = {prov: r["median_ms"] for prov, r in t.items()}
        speedups = {"tec_fast.pack": ms["torch_bool_index+cumsum"] / ms["tec_fast.pack"],
                    "tec_fast.unpack": ms["torch_unpack"] / ms["tec_fast.unpack"]}
        vs_index = ms["torch_bool_index+cumsum+nonzero"] / ms["tec_fast.pack"]
        bytes_moved = 2 * packed.numel() * packed.element_size()  # kept rows read + written
        for prov, (bench, _) in providers.items():
            rows.append(dict(bench=bench, provider=prov, shape=shape, dtype=name, **t[prov],
                             speedup=speedups.get(prov, 1.0),
                             gb_per_s=bytes_moved / (ms[prov] * 1e-3) / 1e9, **extra,
                             **({"speedup_vs_with_index": vs_index} if prov == "tec_fast.pack" else {})))
        print(f"pack {name} {shape}: {speedups['tec_fast.pack']:.2f}x vs x[keep]+cumsum, "
              f"{vs_index:.2f}x vs that + nonzero index; unpack {speedups['tec_fast.unpack']:.2f}x")

    print(format_table(plan_rows + rows, ["bench", "provider", "dtype", "median_ms", "p20_ms",
                                          "p80_ms", "speedup", "fill_rate"]))
    append_results(plan_rows, args.results_dir, cpu)
    path = append_results(rows, args.results_dir, device)
    print(f"appended {len(plan_rows) + len(rows)} rows under {os.path.dirname(path)}")
    return plan_rows + rows


if __name__ == "__main__":
    main()
