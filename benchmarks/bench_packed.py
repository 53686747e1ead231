"""Packed vs padded encoder at a mask ratio drawn per image, in the same process.

Each image draws its mask ratio from [lo, hi]. *Packed*: the CLS token and the kept patches of all
images in one sequence, block-diagonal attention (``TECModel.encode`` on a packed ``TokenLayout``;
the backend ``ops.attention`` picks: flash varlen on a recent GPU in bf16), no padding, the keep
mask made on the host as the trainer makes it (nothing read back from the GPU). *Padded*: what a
dense batched encoder must do without packing: every image padded to the batch's largest visible
count (the dense path at that count; padding tokens cost what real ones do). Both: encoder +
encoder adapter, forward and backward; with ``--whole-step`` also the whole TEC step (base
targets, encoder, decoders, losses, backward) as ``packed_step`` / ``padded_step``.

    python -m benchmarks.bench_packed                      # ViT-B/16, 224, bf16, batch 256 on GPU
    python -m benchmarks.bench_packed --batch-sizes 64 256 --whole-step
    python -m benchmarks.bench_packed --device cpu --preset tiny --batch 8

Each provider's start is a line on stderr (``[2/4] packed B=256 ...``): on a CPU the default
ViT-B/16 takes minutes.
"""
from __future__ import annotations

import argparse
import os
from typing import List

import torch


from benchmarks.bench_step import PRESETS, build
from benchmarks.common import (DTYPES, append_results, default_device, device_arg, exit_if_failed, format_table,
                               fx_tracing_notice_dropped, make_parser, progress, provider_failed,
                               refuse_no_visible_patch, results_dir, time_callable)
from tec_fast import BaseModel, TECModel
from tec_fast.masking import variable_masking
from tec_fast.models.layout import TokenLayout
from tec_fast.models.masking import Masking
from tec_fast.cli.flags import NON_NEGATIVE, POSITIVE, SEED
from tec_fast.ops.attention import packed_attention_backend


def _ratios(text: str):
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI, got {text!r}") from None
    if not 0 < lo <= hi < 1:
        raise argparse.ArgumentTypeError(f"need 0 < LO <= HI < 1, got {text!r}")
    return lo, hi


def parse_args(argv=None):
    p = make_parser("bench_packed", __doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="vit_base",
                   help="model size, bench_step's PRESETS (default vit_base: ViT-B/16 at 224; "
                        "tiny: 32 px, 64 patches, for a CPU)")
    p.add_argument("--device", type=device_arg, default=default_device(),
                   help="cpu, cuda or cuda:N (default: cuda where there is one, else cpu)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--batch", type=POSITIVE, help="one batch size (default 256 on GPU, 8 on CPU)")
    sizes.add_argument("--batch-sizes", type=POSITIVE, nargs="+", metavar="B", help="several batch sizes")
    p.add_argument("--ratios", type=_ratios, default=(0.6, 0.9), help="mask-ratio range LO:HI (default 0.6:0.9)")
    p.add_argument("--precision", choices=sorted(DTYPES), default="bf16",
                   help="autocast dtype of both providers, fp32 = no autocast (default bf16)")
    p.add_argument("--steps", type=POSITIVE, default=10, help="timed calls per provider (default 10)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="untimed calls first (default 2)")
    p.add_argument("--whole-step", action="store_true",
                   help="also time the whole TEC step packed and padded (base targets to backward)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the per-image ratios and masks (default 0)")
    p.add_argument("--results-dir", type=results_dir,
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder the rows are appended to, as <device>.jsonl (made if missing; "
                        "default benchmarks/results)")
    args = p.parse_args(argv)
    refuse_no_visible_patch(p, "--ratios", args.ratios[1], PRESETS[args.preset][1].num_patches,
                            f"preset {args.preset}")
    return args


def providers_per_batch(args) -> int:
    """How many providers ``run`` times per batch size (the progress lines' total)."""
    return 4 if args.whole_step else 2


def run(args, B: int, device: torch.device, failures: List[str], started=lambda what: None):
    """The rows of one batch size; ``started`` is told each provider before it is timed. A provider
    that raises is reported and listed in ``failures``."""
    lo, hi = args.ratios
    bvit, cfg, topk = build(args.preset, device)
    enc = cfg.encoder
    L, grid = enc.num_patches, enc.grid_size
    g = torch.Generator().manual_seed(args.seed)
    ratios = lo + (hi - lo) * torch.rand(B, generator=g)
    noise = torch.rand(B, L, generator=g)
    keep, _ = variable_masking(B, L, ratios, noise=noise)  # on the host, as the trainer draws it
    k_max = int(keep.sum(1).max())
    ids_keep = torch.argsort(noise, dim=1)[:, :k_max].to(device)  # padded: everyone at the max count
    pad_ratio = 1 - (k_max + 0.5) / L  # the dense path keeps int(L * (1 - r)) = k_max

    model = TECModel(cfg).to(device)
    images = torch.randn(B, 3, enc.img_size, enc.img_size, device=device)
    dtype = DTYPES[args.precision]
    amp = dict(device_type=device.type, dtype=dtype, enabled=args.precision != "fp32")

    def padded():
        with torch.autocast(**amp):
            layout = TokenLayout([(grid, grid)] * B, device).with_masking(Masking(ids_keep, None, None))
            out = model.encoder_adaptor(model.encode(layout, images))
        out.float().sum().backward()

    def packed():
        with torch.autocast(**amp):
            feats = model.encode(model.layout_for(B, keep=keep, device=device), images)  # [D, T, C]
            out = model.encoder_adaptor(feats.unsqueeze(1))
        out.float().sum().backward()

    providers = [("padded", padded), ("packed", packed)]
    if args.whole_step:
        base = BaseModel(bvit, topk=topk).to(device)

        def whole_step(**masking):
            def step():
                with torch.autocast(**amp):
                    with torch.no_grad():
                        t = base(images)
                    loss = model(images, t, **masking)["loss"]
                loss.backward()
            return step
        providers += [("padded_step", whole_step(mask_ratio=pad_ratio)), ("packed_step", whole_step(keep=keep))]

    backend, why = packed_attention_backend(device, dtype, enc.embed_dim // enc.num_heads)
    tokens_packed, tokens_padded = int(keep.sum()) + B, B * (1 + k_max)
    results = {}
    for name, fn in providers:
        started(f"{name} B={B}")
        try:
            results[name] = time_callable(fn, device, warmup=args.warmup, reps=args.steps)
        except Exception as exc:  # one broken provider (a backend that fails on the lent GPU) costs its row alone
            provider_failed(failures, f"B={B} {name}", exc)
    rows = []
    for name, r in results.items():
        is_packed = name.startswith("packed")
        row = dict(bench="packed_encoder" if name in ("packed", "padded") else "packed_step", provider=name,
                   preset=args.preset, shape=f"B={B},L={L},ratios={lo}:{hi}", dtype=args.precision,
                   tokens=tokens_packed if is_packed else tokens_padded,
                   attention_backend=backend if is_packed else "sdpa", **r)
        padded_r = results.get(name.replace("packed", "padded"))
        if is_packed and padded_r:
            row["speedup"] = padded_r["median_ms"] / r["median_ms"]
        rows.append(row)
    print(format_table(rows, ["provider", "shape", "tokens", "attention_backend", "median_ms", "p20_ms",
                              "p80_ms", "peak_mem_gb", "speedup"]))
    print(f"mean visible count {keep.sum(1).float().mean():.1f} of L={L} (max {k_max}); "
          f"packed attention: {backend}" + (f" (skipped: {'; '.join(why)})" if why else "") + "\n")
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    sizes = args.batch_sizes or [args.batch or (256 if device.type == "cuda" else 8)]
    rows, failures, path, total = [], [], None, len(sizes) * providers_per_batch(args)
    count = iter(range(1, total + 1))
    with fx_tracing_notice_dropped():
        for B in sizes:
            size_rows = run(args, B, device, failures, lambda what: progress(next(count), total, what))
            if size_rows:  # written batch size by batch size: a run cut short keeps what it measured
                path = append_results(size_rows, args.results_dir, device)
            rows += size_rows
    print(f"results appended to {path}" if path else "no rows to append")
    exit_if_failed(failures)
    return rows


if __name__ == "__main__":
    main()
