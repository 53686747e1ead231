"""Probe: would the exact GELU be cheaper inside fc1's GEMM than after it?

The traffic model (``benchmarks/traffic.py``) puts the engine's ViT-B/16 step, B=256, at 0.49x
the eager baseline's on an H200 against a goal of 0.45x. Its "floor" line shows why the unfused
design cannot get there: with every op other than the GEMMs, the attention, the fused kernels and
the optimizer made free, the estimate is still 0.46x. What is left is the fused kernels' own
traffic, the largest of which is the GELU: its input and output go through memory because cuBLAS
writes fc1's output and reads fc2's input. A GEMM that applies bias + exact GELU to its
accumulator before storing saves that pass, but only if its main loop is as fast as cuBLAS's and
the epilogue's instructions (about 27 per element, ``docs/performance.md``) hide behind the
memory traffic. The traffic model cannot judge either: it assumes every GEMM at 100% of peak.
This script measures it, per fc1 shape of one TEC step (bf16, no autograd), three ways:

* ``cublas+gelu``: ``torch.addmm`` (cuBLAS, bias in its epilogue) then the engine's GELU kernel
  (``tec_fast.kernels.mlp``): what ``tec_fast.ops.mlp`` does today;
* ``triton``: the Triton GEMM below with the bias added in its epilogue: how far a Triton main
  loop is from cuBLAS on this shape;
* ``triton+gelu``: the same GEMM with bias + exact GELU (the engine's ``_gelu``) in the epilogue.

``triton+gelu`` against ``triton`` is what the epilogue costs inside a GEMM; against
``cublas+gelu`` it is what fusing would win or lose today. Each Triton variant takes the fastest
of a few tile configurations, timed in the same run. The GEMM here is a plain pipelined
``tl.dot`` loop (no TMA, no warp specialisation): if its epilogue is nearly free but its main loop
loses to cuBLAS, the case for a better GEMM is made; if the epilogue itself costs about what the
standalone GELU does, fusion cannot pay on this hardware.

Without a GPU, ``--offline`` compiles the kernels for sm_90 (Triton's compiler, no device) and
prints registers, spills and the Hopper warpgroup-MMA instructions (``HGMMA``) in the machine
code, the check that ``tl.dot`` became tensor-core code on an H100/H200.

    python benchmarks/gemm_epilogue.py                 # on a GPU: the fc1 shapes of ViT-B/16, B=256
    python benchmarks/gemm_epilogue.py --offline       # anywhere: compile for sm_90 and report
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import append_results, format_table, time_callable  # noqa: E402
from tec_fast.kernels.mlp import _gelu, _mlp_gelu_fwd  # noqa: E402

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
def _linear_act_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, GELU: tl.constexpr):
    """out = act(x W^T + b), x [M, K], W [N, K] (both K-contiguous), b [N]; fp32 accumulator.
    Programs walk the output tiles GROUP_M tile-rows at a time so that neighbouring programs
    share W's tiles in L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
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


def linear_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gelu: bool,
               config: Tuple[int, int, int, int, int] = INTERPRETER_CONFIG) -> torch.Tensor:
    """act(x @ w.T + b) with the Triton GEMM: x [M, K], w [N, K], b [N], one dtype; act = exact
    GELU or none."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"linear_act: x [M, K], w [N, K], b [N] expected, got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}, {tuple(b.shape)}")
    if not (x.dtype == w.dtype == b.dtype) or not (x.device == w.device == b.device):
        raise ValueError(f"linear_act: x, w, b need one dtype and device, got {x.dtype}/{w.dtype}/{b.dtype} "
                         f"on {x.device}/{w.device}/{b.device}")
    x, w = x.contiguous(), w.contiguous()
    (M, K), N = x.shape, w.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages = config
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _linear_act_kernel[grid](x, w, b, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, GELU=gelu,
                             num_warps=warps, num_stages=stages)
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


def run_gpu(batch: int, device: torch.device) -> List[Dict]:
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
        for provider, gelu in (("triton", False), ("triton+gelu", True)):
            timed[provider] = _best_config(lambda cfg: linear_act(x, w, b, gelu, cfg), device)
        cfg = timed["triton+gelu"][0]
        err = (linear_act(x, w, b, True, cfg).float() - ref.float()).abs().max().item()
        base_ms = timed["cublas+gelu"][1]["median_ms"]
        for provider, (config, t) in timed.items():
            rows.append(dict(bench="gemm_epilogue", provider=provider, shape=f"M={M},K={K},N={N}", case=name,
                             dtype="bf16", **t, tflop_per_s=flops / t["median_ms"] / 1e9,
                             speedup=base_ms / t["median_ms"], config=list(config) if config else None,
                             max_abs_diff_vs_cublas_gelu=err if provider == "triton+gelu" else None,
                             baseline="cublas+gelu"))
        gelu_alone = base_ms - timed["cublas"][1]["median_ms"]
        epilogue = timed["triton+gelu"][1]["median_ms"] - timed["triton"][1]["median_ms"]
        print(f"    GELU as its own kernel: {gelu_alone:.3f} ms; inside the Triton GEMM's epilogue: "
              f"{epilogue:.3f} ms; fused max |diff| {err:.2e}", flush=True)
    return rows


# ---- offline, for sm_90 ----------------------------------------------------------------------

def hgmma_count(cubin: bytes, arch: int) -> Optional[int]:
    """Hopper warpgroup-MMA instructions in a cubin's machine code (None without nvdisasm)."""
    from benchmarks.compile_report import ptxas_path
    nvdisasm = os.path.join(os.path.dirname(ptxas_path(arch)), "nvdisasm")
    if not os.access(nvdisasm, os.X_OK):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True).stdout
    return len(re.findall(r"\bHGMMA\.", out))


def run_offline(batch: int, arch: int = 90) -> List[Dict]:
    """Compile both Triton variants at every shape and GPU config for sm_<arch>; no GPU needed."""
    from benchmarks.compile_report import compile_only, ptxas_usage, sass_instructions
    rows = []
    M, K, N = SHAPES["base fc1 (ViT-B, 197 tokens)"](batch)
    x, w, b = (torch.empty(*s, device="meta", dtype=torch.bfloat16) for s in ((M, K), (N, K), (N,)))
    for cfg in GPU_CONFIGS:
        for gelu in (False, True):
            with compile_only(arch) as compiled:
                linear_act(x, w, b, gelu, cfg)
            kernel = compiled[0].kernel
            use = ptxas_usage(kernel.asm["ptx"], arch)
            rows.append(dict(config=str(cfg), gelu=gelu, registers=use.registers,
                             spill_bytes=use.spill_store_bytes + use.spill_load_bytes,
                             smem_bytes=int(kernel.metadata.shared or 0),
                             sass_instructions=sass_instructions(kernel.asm["cubin"], arch),
                             hgmma=hgmma_count(kernel.asm["cubin"], arch)))
    return rows


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="images per step; sets the GEMMs' M (default 256)")
    p.add_argument("--device", default="cuda", help="the GPU to time on (default cuda)")
    p.add_argument("--offline", action="store_true",
                   help="no GPU: compile the Triton variants for sm_90 and print registers, spills, "
                        "machine instructions and HGMMA (warpgroup MMA) counts")
    p.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="where <device>.jsonl rows are appended (GPU runs)")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.offline:
        rows = run_offline(args.batch)
        M, K, N = SHAPES["base fc1 (ViT-B, 197 tokens)"](args.batch)
        print(f"sm_90 compile of the base model's fc1 GEMM, M={M} K={K} N={N}, bf16 (spills: bytes "
              f"stored + loaded; hgmma: warpgroup-MMA instructions, loop body counted once):")
        print(format_table(rows, ["config", "gelu", "registers", "spill_bytes", "smem_bytes",
                                  "sass_instructions", "hgmma"]))
        return rows
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        p.error("timing needs a CUDA GPU; use --offline to compile for sm_90 without one")
    rows = run_gpu(args.batch, device)
    print(format_table(rows, ["case", "provider", "median_ms", "tflop_per_s", "speedup", "config"]))
    print(f"rows appended to {append_results(rows, args.results_dir, device)}")
    return rows


if __name__ == "__main__":
    main()
