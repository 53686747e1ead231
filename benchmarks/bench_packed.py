"""Packed vs padded encoder at variable mask ratios (issue 5), in the same process.

Each image draws its mask ratio from [lo, hi]. *Packed*: the CLS token and the kept patches of all
images in one sequence, block-diagonal attention (``TECModel.encode`` on a packed ``TokenLayout``), no
padding. *Padded*: what a dense batched encoder must do without packing — every image padded to
the batch's largest visible count (the dense path at that count; padding tokens cost what real
ones do). Both: encoder + encoder adapter, forward and backward.

    python benchmarks/bench_packed.py                      # ViT-B/16, 224, bf16, batch 256 on GPU
    python benchmarks/bench_packed.py --device cpu --preset tiny --batch 8
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_step import PRESETS, build  # noqa: E402
from benchmarks.common import DTYPES, append_results, format_table, time_callable  # noqa: E402
from tec_fast import TECModel  # noqa: E402
from tec_fast.ops.attention import packed_attention_backend  # noqa: E402
from tec_fast.masking import variable_masking  # noqa: E402
from tec_fast.models.layout import TokenLayout  # noqa: E402
from tec_fast.models.masking import Masking  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="vit_base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 256 on GPU, 8 on CPU")
    p.add_argument("--ratios", default="0.6:0.9", help="mask-ratio range lo:hi")
    p.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    B = args.batch or (256 if device.type == "cuda" else 8)
    lo, hi = (float(v) for v in args.ratios.split(":"))
    bvit, cfg, _ = build(args.preset, device)
    enc = cfg.encoder
    L = enc.num_patches
    g = torch.Generator().manual_seed(args.seed)
    ratios = lo + (hi - lo) * torch.rand(B, generator=g)
    noise = torch.rand(B, L, generator=g)
    keep, _ = variable_masking(B, L, ratios, noise=noise)
    keep = keep.to(device)
    k_max = int(keep.sum(1).max())
    ids_keep = torch.argsort(noise, dim=1)[:, :k_max].to(device)  # padded: everyone at the max count

    model = TECModel(cfg).to(device)
    images = torch.randn(B, 3, enc.img_size, enc.img_size, device=device)
    dtype = DTYPES[args.precision]

    def padded():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32"):
            layout = TokenLayout([(enc.grid_size, enc.grid_size)] * B, device) \
                .with_masking(Masking(ids_keep, None, None))  # the encoder reads only ids_keep
            out = model.encoder_adaptor(model.encode(layout, images))
        out.float().sum().backward()

    def packed():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32"):
            feats = model.encode(model.layout_for(B, keep=keep, device=device), images)  # [D, T, C]
            out = model.encoder_adaptor(feats.unsqueeze(1))
        out.float().sum().backward()

    backend, why = packed_attention_backend(device, dtype)
    tokens_packed = int(keep.sum()) + B
    tokens_padded = B * (1 + k_max)
    rows = []
    results = {name: time_callable(fn, device, warmup=args.warmup, reps=args.steps)
               for name, fn in (("padded", padded), ("packed", packed))}
    for name, r in results.items():
        row = dict(bench="packed_encoder", provider=name, preset=args.preset,
                   shape=f"B={B},L={L},ratios={lo}:{hi}", dtype=args.precision,
                   tokens=tokens_packed if name == "packed" else tokens_padded,
                   attention_backend=backend if name == "packed" else "sdpa", **r)
        if name == "packed":
            row["speedup"] = results["padded"]["median_ms"] / r["median_ms"]
        rows.append(row)
    print(format_table(rows, ["provider", "shape", "tokens", "attention_backend", "median_ms", "p20_ms",
                              "p80_ms", "peak_mem_gb", "speedup"]))
    print(f"\nmean visible count {keep.sum(1).float().mean():.1f} of L={L} (max {k_max}); "
          f"packed attention: {backend}" + (f" (skipped: {'; '.join(why)})" if why else ""))
    path = append_results(rows, args.results_dir, device)
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()
