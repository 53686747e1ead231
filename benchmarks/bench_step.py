"""One TEC training step, engine vs the eager baseline, in the same process.

Step = base-model forward (no grad) + new-model forward/backward + optimizer step, on
device-resident synthetic images (the loader is not measured). Prints images/s, the ratio to the
baseline, model-FLOPs utilisation and peak memory, and appends one JSON line per provider to
``benchmarks/results/<device>.jsonl``.

MFU = counted model FLOPs (``benchmarks/flops.py``) x images/s, divided by a dense bf16 peak, two
ways: the bf16 GEMM throughput measured in the same run on the same device with the same timer
(``gemm_tflops``, ``mfu_measured_peak``), and the vendor's published dense bf16 peak for the
device (``published_peak_tflops``, ``mfu``; None for a device not in ``PUBLISHED_BF16_TFLOPS``).

    python -m benchmarks.bench_step                         # ViT-B/16, 224, bf16, batch 64..256 on GPU
    python -m benchmarks.bench_step --preset tiny --device cpu --batch-sizes 4 --steps 3
"""
from __future__ import annotations

import os
from typing import Optional

import torch


from benchmarks.baseline_eager import EagerBase, EagerTEC
from benchmarks.common import (DTYPES, append_results, default_device, device_arg, exit_if_failed, make_parser,
                               progress, provider_failed, refuse_no_visible_patch, results_dir, time_callable)
from benchmarks.flops import tec_step_flops
from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast.cli.flags import NON_NEGATIVE, POSITIVE, real
from tec_fast.presets import vit_preset
from tec_fast.training.precision import CastWeightsOnce, autocast_copy
from tec_fast.training.cuda_graph import capture_step
from tec_fast.training.graphed import GraphedStep

PRESETS = {
    # name: (base ViT, new ViT, decoder dim, depth, heads, topk)
    "vit_base": (vit_preset("vit_base_patch16"), vit_preset("vit_base_patch16"), 512, 2, 16, 15),
    "vit_large": (vit_preset("vit_large_patch16"), vit_preset("vit_large_patch16"), 768, 2, 16, 15),
    "tiny": (ViTConfig(32, 4, 64, 4, 4), ViTConfig(32, 4, 64, 6, 4), 32, 1, 4, 5),
}
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, matched
# against torch.cuda.get_device_name in this order (the SXM H100 reports itself as "H100 80GB HBM3").
PUBLISHED_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0),
)


def published_peak_tflops(device: torch.device) -> Optional[float]:
    """The published dense bf16 peak of ``device``; None when the device is not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PUBLISHED_BF16_TFLOPS if key in name), None)


def measure_gemm_tflops(device: torch.device, n: int, reps: int = 20) -> float:
    """bf16 TFLOP/s of an n x n x n matmul, timed with ``time_callable`` like the step itself."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_callable(lambda: torch.mm(a, b), device, warmup=3, reps=reps, measure_memory=False)
    return 2.0 * n ** 3 / (t["median_ms"] / 1e3) / 1e12


def build(preset: str, device: torch.device, seed: int = 0):
    bvit, vit, cd, dd, dh, topk = PRESETS[preset]
    torch.manual_seed(seed)
    cfg = TECConfig(encoder=vit, decoder_dim=cd, decoder_depth=dd, decoder_heads=dh, tau=1.8,
                    pred_dim=bvit.embed_dim, pred_heads=bvit.num_heads)
    return bvit, cfg, topk


def _train_step(loss_fn, opt, scaler):
    """One optimizer step around ``loss_fn`` (loss scaling is a no-op when the scaler is off)."""
    def step():
        scaler.scale(loss_fn()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def _engine_models(bvit, cfg, topk, device, precision, cast_once: bool = True):
    """(frozen base, new model) as the engine trains them; ``cast_once=False``: the base in fp32,
    cast by autocast at every step, as ``fit`` ran it before ``training/precision.py``."""
    base = BaseModel(bvit, topk=topk).to(device)
    if precision != "fp32" and cast_once:  # as the trainer runs it: frozen GEMM weights cast once
        base = autocast_copy(base, DTYPES[precision])
    return base, TECModel(cfg).to(device)


def _as_trained(model, precision, cast_once: bool = True):
    """The new model called as ``fit`` calls it in one process: with bf16 / fp16, its Linear and
    conv weights cast in one multi-tensor kernel per step (``CastWeightsOnce``); with
    ``cast_once=False`` directly (autocast casts each weight, autograd each gradient)."""
    return model if precision == "fp32" or not cast_once else CastWeightsOnce(model, DTYPES[precision])


def engine_step_fn(bvit, cfg, topk, images, precision, compile_, mask_ratio, cast_once: bool = True):
    device = images.device
    dtype = DTYPES[precision]
    base, model = _engine_models(bvit, cfg, topk, device, precision, cast_once)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    fwd = torch.compile(model) if compile_ else _as_trained(model, precision, cast_once)

    def loss():
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            return fwd(images, base(images), mask_ratio=mask_ratio)["loss"]
    return _train_step(loss, opt, scaler)


def engine_graph_step_fn(bvit, cfg, topk, images, precision, mask_ratio):
    """The engine's step recorded once into a CUDA graph and replayed (no host work per step but
    the replay call): fused AdamW with capturable=True; bf16 or fp32 only (fp16 needs a loss
    scaler, whose skipped steps are host decisions)."""
    if precision == "fp16":
        raise ValueError("--cuda-graph needs --precision bf16 or fp32 (fp16's loss scaler decides on the host)")
    dtype = DTYPES[precision]
    base, model = _engine_models(bvit, cfg, topk, images.device, precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True, capturable=True)
    fwd = _as_trained(model, precision)

    def body():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=precision != "fp32", cache_enabled=False):
            loss = fwd(images, base(images), mask_ratio=mask_ratio)["loss"]
        loss.backward()
        opt.step()
        return loss
    return capture_step(body, opt)


def engine_fit_graph_step_fn(bvit, cfg, topk, images, precision, mask_ratio, graphed_step=GraphedStep):
    """The step as ``fit`` runs it by default (``tec_fast/training/graphed.py``): the recorded
    forward+backward replayed, the one host sync per step that fit makes (its metrics read back
    for the NaN guard), then the recorded optimizer step; one eager step first, as in fit."""
    if precision == "fp16":
        raise ValueError("--cuda-graph needs --precision bf16 or fp32 (fp16's loss scaler decides on the host)")
    amp = DTYPES[precision] if precision != "fp32" else None
    base, model = _engine_models(bvit, cfg, topk, images.device, precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    fwd = _as_trained(model, precision)

    def objective(m, batch, noise):
        return m(batch[0], base(batch[0]), mask_ratio=mask_ratio, noise=noise)
    graphed = graphed_step(model, fwd, objective, opt, None, amp, images.device)
    batch, noise = (images,), torch.rand(images.shape[0], cfg.encoder.num_patches, device=images.device)
    with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = objective(fwd, batch, noise)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    graphed.record(batch, noise)

    def step():
        _, sums = graphed.micro_step(batch, noise, True)
        sums.tolist()
        graphed.step({})
    return step


def baseline_step_fn(bvit, cfg, topk, images, mask_ratio):
    """The public reference code's step: fp16 autocast + GradScaler, torch AdamW (fp16 only where
    the device has it: on CPU the baseline runs bf16 autocast)."""
    device = images.device
    base = EagerBase(bvit, topk=topk).to(device).eval()
    model = EagerTEC(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)

    def loss():
        with torch.autocast(device.type, dtype=half):
            with torch.no_grad():
                t = base(images)
            return model(images, t, mask_ratio=mask_ratio)["loss"]
    return _train_step(loss, opt, scaler)


def main(argv=None):
    p = make_parser("bench_step", __doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="vit_base",
                   help="model size: base and new ViT, decoder and top-k (PRESETS; default vit_base: ViT-B/16 at 224; "
                        "tiny: 32 px, 64 patches, for a CPU)")
    p.add_argument("--device", type=device_arg, default=default_device(),
                   help="cpu, cuda or cuda:N (default: cuda where there is one, else cpu)")
    p.add_argument("--batch-sizes", type=POSITIVE, nargs="+", default=None,
                   help="default: 64 128 256 on GPU, 4 on CPU")
    p.add_argument("--precision", choices=sorted(DTYPES), default="bf16",
                   help="the engine's autocast dtype, fp32 = no autocast (default bf16; the baseline always "
                        "runs fp16 autocast on GPU, bf16 on CPU)")
    p.add_argument("--mask-ratio", type=real(0, 1, lo_open=True, hi_open=True), default=0.75,
                   help="share of the patches hidden from the encoder, in (0, 1) (default 0.75)")
    p.add_argument("--steps", type=POSITIVE, default=10, help="timed steps per provider (after warm-up)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=3, help="untimed steps first (default 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's model")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the eager baseline (benchmarks/baseline_eager.py): engine rows only, no speedup")
    p.add_argument("--per-weight-casts", action="store_true",
                   help="also time provider engine_autocast: the engine with the frozen base in fp32 and "
                        "every weight cast by autocast at every step (how fit ran before "
                        "tec_fast/training/precision.py), to measure what casting once saves")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time the engine's step recorded into a CUDA graph and replayed "
                        "(provider engine_graph: one graph, no host work; engine_fit_graph: as fit "
                        "replays it by default, two graphs and one host sync per step; CUDA only)")
    p.add_argument("--gemm-size", type=POSITIVE, default=None,
                   help="n of the n x n x n bf16 matmul whose measured TFLOP/s is the MFU peak "
                        "(default: 8192 on GPU, 1024 on CPU)")
    p.add_argument("--published-peak-tflops", type=real(0, lo_open=True), default=None,
                   help="dense bf16 peak for a device missing from PUBLISHED_BF16_TFLOPS")
    p.add_argument("--results-dir", type=results_dir,
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder the rows are appended to, as <device>.jsonl (made if missing; "
                        "default benchmarks/results)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        p.error(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    refuse_no_visible_patch(p, "--mask-ratio", args.mask_ratio, PRESETS[args.preset][1].num_patches,
                            f"preset {args.preset}")
    bvit, cfg, topk = build(args.preset, device)
    flops = tec_step_flops(bvit, cfg, args.mask_ratio, topk)["total"]
    batch_sizes = args.batch_sizes or ([64, 128, 256] if device.type == "cuda" else [4])
    gemm_tflops = measure_gemm_tflops(device, args.gemm_size or (8192 if device.type == "cuda" else 1024))
    published = args.published_peak_tflops or published_peak_tflops(device)
    print(f"bf16 GEMM measured here: {gemm_tflops:.1f} TFLOP/s; published dense bf16 peak: "
          + (f"{published:.0f} TFLOP/s" if published else "unknown for this device (MFU vs published: -)"))
    rows, failures, path = [], [], None
    print(f"{'batch':>5} {'provider':<15} {'ms/step':>9} {'img/s':>9} {'speedup':>8} {'MFU meas':>8} "
          f"{'MFU pub':>7} {'peak GB':>8}")
    case = 0
    for B in batch_sizes:
        images = torch.randn(B, 3, bvit.img_size, bvit.img_size, device=device)
        providers = [("engine", lambda: engine_step_fn(bvit, cfg, topk, images, args.precision,
                                                       args.compile, args.mask_ratio))]
        if args.per_weight_casts:
            providers.append(("engine_autocast", lambda: engine_step_fn(bvit, cfg, topk, images, args.precision,
                                                                        False, args.mask_ratio, cast_once=False)))
        if args.cuda_graph:
            providers.append(("engine_graph", lambda: engine_graph_step_fn(bvit, cfg, topk, images,
                                                                           args.precision, args.mask_ratio)))
            providers.append(("engine_fit_graph", lambda: engine_fit_graph_step_fn(
                bvit, cfg, topk, images, args.precision, args.mask_ratio)))
        if not args.no_baseline:
            providers.append(("baseline", lambda: baseline_step_fn(bvit, cfg, topk, images, args.mask_ratio)))
        results = {}
        for name, make in providers:
            case += 1
            progress(case, len(batch_sizes) * len(providers), f"B={B} {name}")
            try:
                step = make()
                t = time_callable(step, device, warmup=args.warmup, reps=args.steps)
            except torch.OutOfMemoryError:
                print(f"{B:>5} {name:<15} out of memory")
                results[name] = None
                continue
            except Exception as exc:  # one broken provider (a Triton compile, a graph capture) costs its rows alone
                provider_failed(failures, f"B={B} {name}", exc)
                results[name] = None
                continue
            finally:
                step = None
            if name in ("engine_graph", "engine_fit_graph"):
                t["peak_mem_gb"] = None  # the graph's memory pool is taken at capture, before the measured call
            img_s = B / (t["median_ms"] / 1e3)
            results[name] = dict(t, img_per_s=img_s)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ref = results.get("baseline")
        size_rows = []
        for name, r in results.items():
            if r is None:
                continue
            achieved = flops * r["img_per_s"] / 1e12  # model TFLOP/s
            mfu = achieved / published if published else None
            row = dict(bench="step", provider=name, preset=args.preset, shape=f"B={B},S={bvit.img_size}",
                       dtype=args.precision if name.startswith("engine") else
                       ("fp16-amp" if device.type == "cuda" else "bf16-amp"), mask_ratio=args.mask_ratio,
                       compile=args.compile and name == "engine", gflop_per_img=flops / 1e9,
                       model_tflops=achieved, gemm_tflops=gemm_tflops,
                       mfu_measured_peak=achieved / gemm_tflops, published_peak_tflops=published,
                       mfu=mfu, **r)
            if name.startswith("engine") and ref:
                row.update(baseline_img_per_s=ref["img_per_s"], speedup=r["img_per_s"] / ref["img_per_s"],
                           baseline_peak_mem_gb=ref.get("peak_mem_gb"))
            size_rows.append(row)
            sp = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
            mfu_s = f"{mfu:.1%}" if mfu is not None else "-"
            mem_s = f"{r['peak_mem_gb']:.2f}" if r.get("peak_mem_gb") is not None else "-"
            print(f"{B:>5} {name:<15} {r['median_ms']:>9.2f} {r['img_per_s']:>9.1f} {sp:>8} "
                  f"{row['mfu_measured_peak']:>8.1%} {mfu_s:>7} {mem_s:>8}")
        if size_rows:  # written batch size by batch size: a run cut short keeps what it measured
            path = append_results(size_rows, args.results_dir, device)
        rows += size_rows
    print(f"\nFLOPs counted: {flops / 1e9:.1f} GFLOP per image (benchmarks/flops.py). MFU meas: against the "
          f"bf16 GEMM measured above ({gemm_tflops:.1f} TFLOP/s); MFU pub: against the published peak. "
          + (f"Results appended to {path}" if path else "No rows to append."))
    exit_if_failed(failures)
    return rows


if __name__ == "__main__":
    main()
