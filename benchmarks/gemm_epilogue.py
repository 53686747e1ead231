"""Probe: would the exact GELU be cheaper inside fc1's GEMM than after it?

The traffic model (``benchmarks/traffic.py``) puts the engine's ViT-B/16 step, B=256, at 0.50x
the eager baseline's on an H200 against a goal of 0.45x. Its "floor" line shows why the unfused
design cannot get there: with every op other than the GEMMs, the attention, the fused kernels,
GELU and the optimizer made free, the estimate is still 0.47x. What is left is the fused kernels' own
traffic, the largest of which is the GELU: its input and output go through memory because cuBLAS
writes fc1's output and reads fc2's input. A GEMM that applies bias + exact GELU to its
accumulator before storing saves that pass, but only if its main loop is as fast as cuBLAS's and
the epilogue's instructions (about 27 per element, ``docs/performance.md``) hide behind the
memory traffic. The traffic model cannot judge either: it assumes every GEMM at 100% of peak.
This script measures it, per fc1 shape of one TEC step (bf16, no autograd):

* ``cublas+gelu``: ``torch.addmm`` (cuBLAS, bias in its epilogue) then the engine's GELU kernel
  (``tec_fast.kernels.mlp``): what ``tec_fast.ops.mlp`` does today; ``cublas``: the addmm alone;
* ``triton`` / ``triton+gelu``: a plain pipelined ``tl.dot`` GEMM (one program per output tile)
  with bias, or bias + exact GELU (the engine's ``_gelu``), in its epilogue;
* ``persistent`` / ``persistent+gelu``: the same product with one program per SM walking the
  tiles, operands through TMA descriptors, and the tile and K loops flattened into one, so the
  next tile's loads can be issued while this tile's epilogue runs.

``triton`` against ``cublas`` is how far a Triton main loop is from cuBLAS on the shape;
``...+gelu`` minus the same variant without it is what the epilogue costs inside a GEMM, to set
against the GELU kernel's own time (``cublas+gelu`` minus ``cublas``); ``...+gelu`` against
``cublas+gelu`` is what fusing wins or loses today. Each Triton variant takes the fastest of a few
tile configurations, timed in the same run.

Without a GPU, ``--offline`` compiles the kernels for sm_90 (Triton's compiler, no device) and
prints registers, spills and the Hopper warpgroup-MMA instructions (``HGMMA``) in the machine
code, the check that ``tl.dot`` became tensor-core code on an H100/H200.

    python -m benchmarks.gemm_epilogue                 # on a GPU: the fc1 shapes of ViT-B/16, B=256
    python -m benchmarks.gemm_epilogue --offline       # anywhere: compile for sm_90 and report
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl


from benchmarks.common import (append_results, device_arg, device_name, format_table, make_parser, progress,
                               results_dir, time_callable)
from tec_fast.cli.flags import POSITIVE
from tec_fast.kernels.mlp import _gelu, _mlp_gelu_fwd

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): Hopper-sized tiles for bf16 (8-warp
# 128 x 256 with 3 stages is Triton's own tutorial choice), and one small tile for the interpreter.
GPU_CONFIGS = ((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3))
INTERPRETER_CONFIG = (32, 32, 16, 4, 1)
GROUP_M = 8
# name: (rows, K, N) of fc1 in one ViT-B/16 TEC step at batch B (mask 0.75, decoder 512 x 2)
SHAPES = {
    "base fc1 (ViT-B, 197 tokens)": lambda B: (B * 197, 768, 3072),
    "encoder fc1 (50 visible tokens)": lambda B: (B * 50, 768, 3072),
    "decoder fc1 (2 streams x 197)": lambda B: (2 * B * 197, 512, 2048),
}


@triton.jit
def _tile_coords(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row, column) of output tile ``tile`` when tiles are walked GROUP_M tile-rows at a time."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _linear_act_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, GELU: tl.constexpr):
    """out = act(x W^T + b), x [M, K], W [N, K] (both K-contiguous), b [N]; fp32 accumulator.
    Programs walk the output tiles GROUP_M tile-rows at a time so that neighbouring programs
    share W's tiles in L2."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N] of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        b = tl.load(w_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _linear_act_persistent_kernel(x_desc, w_desc, b_ptr, out_desc, M, N, K,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, GELU: tl.constexpr):
    """The same product, persistent: PROGRAMS programs (one per SM) walk the output tiles, the
    operands come through TMA descriptors, and the tile loop and the K loop are one flattened
    loop, so the compiler's pipeliner can issue the next tile's loads while this tile's epilogue
    (bias, GELU, store) runs. (``warp_specialize=True`` on this loop compiles to the same code for
    sm_90 under Triton 3.6 and 3.9: same registers, shared memory and instruction count.)"""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, tiles_m, tiles_n, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kk in range(k_tiles):
            a = x_desc.load([off_m, kk * BLOCK_K])
            b = w_desc.load([off_n, kk * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        rn = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = _gelu(acc)
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


def _check_operands(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"linear_act: x [M, K], w [N, K], b [N] expected, got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}, {tuple(b.shape)}")
    if not (x.dtype == w.dtype == b.dtype) or not (x.device == w.device == b.device):
        raise ValueError(f"linear_act: x, w, b need one dtype and device, got {x.dtype}/{w.dtype}/{b.dtype} "
                         f"on {x.device}/{w.device}/{b.device}")


def linear_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gelu: bool,
               config: Tuple[int, int, int, int, int] = INTERPRETER_CONFIG) -> torch.Tensor:
    """act(x @ w.T + b) with the Triton GEMM: x [M, K], w [N, K], b [N], one dtype; act = exact
    GELU or none."""
    _check_operands(x, w, b)
    x, w = x.contiguous(), w.contiguous()
    (M, K), N = x.shape, w.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages = config
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _linear_act_kernel[grid](x, w, b, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, GELU=gelu,
                             num_warps=warps, num_stages=stages)
    return out


def linear_act_persistent(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gelu: bool,
                          config: Tuple[int, int, int, int, int] = INTERPRETER_CONFIG,
                          programs: Optional[int] = None) -> torch.Tensor:
    """``linear_act`` through the persistent TMA kernel with ``programs`` programs (default: one
    per SM, 132 where there is no GPU). TMA needs 16-byte-aligned rows: K and N times the element
    size must be multiples of 16."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    _check_operands(x, w, b)
    (M, K), N = x.shape, w.shape[0]
    for name, n in (("K", K), ("N", N)):
        if (n * x.element_size()) % 16:
            raise ValueError(f"linear_act_persistent: rows of {n} {x.dtype} values ({name}) are not "
                             f"16-byte aligned, which TMA needs")
    x, w = x.contiguous(), w.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages = config
    if programs is None:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count \
            if x.device.type == "cuda" else 132
    programs = max(1, min(programs, triton.cdiv(M, bm) * triton.cdiv(N, bn)))
    descs = [TensorDescriptor.from_tensor(t, block) for t, block in ((x, [bm, bk]), (w, [bn, bk]), (out, [bm, bn]))]
    _linear_act_persistent_kernel[(programs,)](descs[0], descs[1], b, descs[2], M, N, K, BLOCK_M=bm,
                                               BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, PROGRAMS=programs,
                                               GELU=gelu, num_warps=warps, num_stages=stages)
    return out


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gelu: bool) -> torch.Tensor:
    """The same in fp32 torch, cast to x's dtype."""
    y = torch.addmm(b.float(), x.float(), w.float().t())
    return (torch.nn.functional.gelu(y) if gelu else y).to(x.dtype)


# ---- on a GPU --------------------------------------------------------------------------------

def _best_config(fn, device) -> Tuple[Tuple[int, ...], Dict]:
    """The fastest of GPU_CONFIGS for ``fn(config)``, with its timing."""
    best = None
    for cfg in GPU_CONFIGS:
        try:
            t = time_callable(lambda: fn(cfg), device, measure_memory=False)
        except Exception as exc:  # a tile that does not fit this GPU's shared memory
            print(f"    config {cfg}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
            continue
        if best is None or t["median_ms"] < best[1]["median_ms"]:
            best = (cfg, t)
    if best is None:
        raise RuntimeError("no tile configuration ran")
    return best


def run_gpu(batch: int, device: torch.device, results_dir: Optional[str] = None) -> List[Dict]:
    """Time every provider at every shape; each shape's rows are appended to
    ``<results_dir>/<device>.jsonl`` as soon as they are measured (a run cut short keeps them)."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for i, (name, shape_of) in enumerate(SHAPES.items(), 1):
        M, K, N = shape_of(batch)
        print(f"[{i}/{len(SHAPES)}] {name}: M={M} K={K} N={N}", flush=True)
        x = torch.randn(M, K, device=device, generator=gen).bfloat16()
        w = (torch.randn(N, K, device=device, generator=gen) * K ** -0.5).bfloat16()
        b = torch.randn(N, device=device, generator=gen).bfloat16() * 0.1
        flops = 2.0 * M * N * K
        ref = _mlp_gelu_fwd(torch.addmm(b, x, w.t()))
        timed = {"cublas+gelu": (None, time_callable(lambda: _mlp_gelu_fwd(torch.addmm(b, x, w.t())), device,
                                                      measure_memory=False))}
        timed["cublas"] = (None, time_callable(lambda: torch.addmm(b, x, w.t()), device, measure_memory=False))
        errors = {}
        for variant, launch in VARIANTS.items():
            for gelu in (False, True):
                provider = ("triton" if variant == "plain" else variant) + ("+gelu" if gelu else "")
                timed[provider] = _best_config(lambda cfg: launch(x, w, b, gelu, cfg), device)
                if gelu:
                    got = launch(x, w, b, True, timed[provider][0])
                    errors[provider] = (got.float() - ref.float()).abs().max().item()
        base_ms = timed["cublas+gelu"][1]["median_ms"]
        case_rows = []
        for provider, (config, t) in timed.items():
            case_rows.append(dict(bench="gemm_epilogue", provider=provider, shape=f"M={M},K={K},N={N}", case=name,
                             dtype="bf16", **t, tflop_per_s=flops / t["median_ms"] / 1e9,
                             speedup=base_ms / t["median_ms"], config=list(config) if config else None,
                             max_abs_diff_vs_cublas_gelu=errors.get(provider), baseline="cublas+gelu"))
        rows += case_rows
        if results_dir:
            append_results(case_rows, results_dir, device)
        ms = {k: v[1]["median_ms"] for k, v in timed.items()}
        print(f"    GELU as its own kernel: {ms['cublas+gelu'] - ms['cublas']:.3f} ms; in the epilogue: "
              f"{ms['triton+gelu'] - ms['triton']:.3f} ms (plain GEMM), "
              f"{ms['persistent+gelu'] - ms['persistent']:.3f} ms (persistent); fused max |diff| "
              + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
    return rows


# ---- offline, for sm_90 ----------------------------------------------------------------------

def hgmma_count(cubin: bytes, arch: int) -> Optional[int]:
    """Hopper warpgroup-MMA instructions in a cubin's machine code (None without nvdisasm)."""
    from benchmarks.compile_report import disassemble
    sass = disassemble(cubin, arch)
    return None if sass is None else len(re.findall(r"\bHGMMA\.", sass))


VARIANTS = {  # kernel variant -> launcher(x, w, b, gelu, config)
    "plain": linear_act,
    "persistent": linear_act_persistent,
}


def run_offline(batch: int, arch: int = 90) -> List[Dict]:
    """Compile every variant, tile and epilogue at the base model's fc1 shape for sm_<arch>; no
    GPU needed. A variant this Triton cannot compile gets a row with its error."""
    from benchmarks.compile_report import compile_only, ptxas_usage, sass_instructions
    rows = []
    M, K, N = SHAPES["base fc1 (ViT-B, 197 tokens)"](batch)
    x, w, b = (torch.empty(*s, device="meta", dtype=torch.bfloat16) for s in ((M, K), (N, K), (N,)))
    total = len(VARIANTS) * len(GPU_CONFIGS) * 2
    for variant, launch in VARIANTS.items():
        for cfg in GPU_CONFIGS:
            for gelu in (False, True):
                progress(len(rows) + 1, total, f"sm_{arch} {variant} config {cfg}{' +gelu' if gelu else ''}")
                row = dict(variant=variant, config=str(cfg), gelu=gelu)
                try:
                    with compile_only(arch) as compiled:
                        launch(x, w, b, gelu, cfg)
                except Exception as exc:  # noqa: BLE001 - reported, the others still compile
                    rows.append(dict(row, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:90]}"))
                    continue
                kernel = compiled[0].kernel
                use = ptxas_usage(kernel.asm["ptx"], arch)
                rows.append(dict(row, registers=use.registers,
                                 spill_bytes=use.spill_store_bytes + use.spill_load_bytes,
                                 smem_bytes=int(kernel.metadata.shared or 0),
                                 sass_instructions=sass_instructions(kernel.asm["cubin"], arch),
                                 hgmma=hgmma_count(kernel.asm["cubin"], arch)))
    return rows


def main(argv=None) -> List[Dict]:
    p = make_parser("gemm_epilogue", __doc__)
    p.add_argument("--batch", type=POSITIVE, default=256, help="images per step; sets the GEMMs' M (default 256)")
    p.add_argument("--device", default="cuda", help="the GPU to time on, cuda or cuda:N (default cuda)")
    p.add_argument("--offline", action="store_true",
                   help="no GPU: compile the Triton variants for sm_90 and print registers, spills, "
                        "machine instructions and HGMMA (warpgroup MMA) counts")
    p.add_argument("--results-dir", type=results_dir,
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="where <device>.jsonl rows are appended (GPU runs; made if missing)")
    args = p.parse_args(argv)
    if args.offline:
        rows = run_offline(args.batch)
        M, K, N = SHAPES["base fc1 (ViT-B, 197 tokens)"](args.batch)
        print(f"sm_90 compile of the base model's fc1 GEMM, M={M} K={K} N={N}, bf16 (spills: bytes "
              f"stored + loaded; hgmma: warpgroup-MMA instructions, loop body counted once):")
        print(format_table(rows, ["variant", "config", "gelu", "registers", "spill_bytes", "smem_bytes",
                                  "sass_instructions", "hgmma", "error"]))
        return rows
    try:  # checked here, not by the flag's type: --offline needs no device, whatever --device says
        device = torch.device(device_arg(args.device))
    except argparse.ArgumentTypeError as exc:
        p.refuse("--device", f"{exc}; use --offline to compile for sm_90 without one")
    if device.type != "cuda":
        p.refuse("--device", f"{args.device}: timing needs a CUDA GPU; use --offline to compile for sm_90 without one")
    rows = run_gpu(args.batch, device, args.results_dir)
    print(format_table(rows, ["case", "provider", "median_ms", "tflop_per_s", "speedup", "config"]))
    print(f"rows appended to {os.path.join(args.results_dir, device_name(device) + '.jsonl')}")
    return rows


if __name__ == "__main__":
    main()
