"""Per-op benchmarks: the Triton kernels against the eager reference, in the same process.

For each op (forward, and forward+backward where the op has gradients): median / p20 / p80 ms,
achieved GB/s (memory-bound ops, counting the bytes the op must move at least) or TFLOP/s
(relation ops, adapter), peak memory, and the speedup over the eager reference
(``tec_fast.ops.reference``; for relation_targets also the full-attention route the public code
takes: all N x N logits, then the rows). A device copy (``clone``) of the same bytes gives the
bandwidth the gather/scatter kernels are measured against. Appends JSON lines to
``<results-dir>/<device>.jsonl``.

    python benchmarks/bench_ops.py --op all --device cuda            # ViT-B/16 sizes, bf16
    python benchmarks/bench_ops.py --op relation_loss --device cuda --dtype fp32
    python benchmarks/bench_ops.py --op all --device cpu             # tiny sizes, reference only
    python benchmarks/bench_ops.py --op all --device cpu --interpret # + Triton via the interpreter
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

# the interpreter must be on before any Triton kernel is defined
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import DTYPES, append_results, device_name, format_table, time_callable  # noqa: E402
from tec_fast.ops import OPS as OP_TABLE  # noqa: E402
from tec_fast.ops import reference  # noqa: E402
from tec_fast.ops.dispatch import fast_impl  # noqa: E402

OPS = tuple(OP_TABLE)  # every op in the registry has a case builder below: <op>_cases

# ViT-B/16 at 224, mask 0.75, batch 256 (GPU); a few hundred elements (CPU smoke runs)
SIZES = {
    "vitb": dict(B=256, L=196, K=49, C=768, Cd=512, H=12, d=64, topk=15, D=12, G=4, hidden=2048),
    "tiny": dict(B=2, L=16, K=4, C=32, Cd=16, H=2, d=16, topk=3, D=6, G=2, hidden=32),
}


class Case:
    """One op at one size: providers (name -> zero-argument callable), the bytes / FLOPs one
    call must at least move / do, and a label of the shape."""

    def __init__(self, shape: str, providers: Dict[str, Callable[[], object]],
                 bytes_moved: Optional[float] = None, flops: Optional[float] = None):
        self.shape, self.providers, self.bytes_moved, self.flops = shape, providers, bytes_moved, flops


def _grad_fn(fn: Callable[[], torch.Tensor], inputs: List[torch.Tensor], grad: Optional[torch.Tensor]):
    def run():
        out = fn()
        return torch.autograd.grad(out, inputs, grad)
    return run


def _fast(op: str):
    return fast_impl(op)


def _autocast(dev: torch.device, dtype: torch.dtype):
    """What the cases with fp32 parameters (as trained) run under: autocast to ``dtype``, off
    for fp32."""
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)


def masked_gather_cases(s, dtype, dev, providers, backward) -> Case:
    B, L, K, C = s["B"], s["L"], s["K"], s["C"]
    x = torch.randn(B, L, C, device=dev, dtype=dtype, requires_grad=backward)
    pos = torch.randn(L, C, device=dev, dtype=dtype, requires_grad=backward)
    ids = torch.rand(B, L, device=dev).argsort(1)[:, :K]
    esize = x.element_size()
    impls = {"reference": reference.masked_gather}
    if "triton" in providers:
        impls["triton"] = _fast("masked_gather")
    if backward:
        grad = torch.randn(B, K, C, device=dev, dtype=dtype)
        fns = {n: _grad_fn(lambda f=f: f(x, ids, pos), [x, pos], grad) for n, f in impls.items()}
        # read grad_out, write grad_x (all of it: zeros elsewhere), write grad_pos
        nbytes = (B * K * C + B * L * C + L * C) * esize
    else:
        fns = {n: (lambda f=f: f(x, ids, pos)) for n, f in impls.items()}
        nbytes = (2 * B * K * C + L * C) * esize
    return Case(f"B={B},L={L},K={K},C={C}", fns, bytes_moved=nbytes)


def scatter_masked_cases(s, dtype, dev, providers, backward) -> Case:
    B, L, K, C = s["B"], s["L"], s["K"], s["Cd"]
    vis = torch.randn(B, K, C, device=dev, dtype=dtype, requires_grad=backward)
    tok = torch.randn(C, device=dev, dtype=dtype, requires_grad=backward)
    pos = torch.randn(L, C, device=dev, dtype=dtype, requires_grad=backward)
    ids_restore = torch.rand(B, L, device=dev).argsort(1).argsort(1)
    esize = vis.element_size()
    impls = {"reference": reference.scatter_masked}
    if "triton" in providers:
        impls["triton"] = _fast("scatter_masked")
    if backward:
        grad = torch.randn(B, L, C, device=dev, dtype=dtype)
        fns = {n: _grad_fn(lambda f=f: f(vis, ids_restore, tok, pos), [vis, tok, pos], grad)
               for n, f in impls.items()}
        nbytes = (B * L * C + B * K * C + L * C + C) * esize
    else:
        fns = {n: (lambda f=f: f(vis, ids_restore, tok, pos)) for n, f in impls.items()}
        nbytes = (B * K * C + B * L * C + L * C) * esize
    return Case(f"B={B},L={L},K={K},C={C}", fns, bytes_moved=nbytes)


def patch_norm_mse_cases(s, dtype, dev, providers, backward) -> Case:
    B, L, C = s["B"], s["L"], s["C"]
    pred = torch.randn(B, L, C, device=dev, dtype=dtype, requires_grad=backward)
    target = torch.randn(B, L, C, device=dev, dtype=dtype)
    mask = (torch.rand(B, L, device=dev) < 0.75).float()
    esize = pred.element_size()
    impls = {"reference": reference.patch_norm_mse}
    if "triton" in providers:
        impls["triton"] = _fast("patch_norm_mse")
    if backward:
        fns = {n: _grad_fn(lambda f=f: f(pred, target, mask), [pred], None) for n, f in impls.items()}
        nbytes = 2 * 2 * B * L * C * esize + B * L * C * esize  # fwd reads both, bwd reads both + writes
    else:
        fns = {n: (lambda f=f: f(pred, target, mask)) for n, f in impls.items()}
        nbytes = 2 * B * L * C * esize
    return Case(f"B={B},L={L},C={C}", fns, bytes_moved=nbytes)


def full_attention_relation_targets(q, k, topk, scale):
    """The public code's route: all N x N logits of every head, then the CLS row and top-k rows."""
    B, H, N, d = q.shape
    attn = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, N, N]
    idx = attn[:, :, 0, 1:].mean(1).topk(topk, dim=1).indices
    rows = torch.cat([torch.zeros_like(idx[:, :1]), idx + 1], 1)
    rel = torch.gather(attn[..., 1:], 2, rows[:, None, :, None].expand(B, H, 1 + topk, N - 1))
    return rel.permute(0, 2, 1, 3).contiguous(), idx


def relation_targets_cases(s, dtype, dev, providers, backward) -> Optional[Case]:
    if backward:
        return None  # targets carry no gradient
    B, H, N, d, topk = s["B"], s["H"], s["L"] + 1, s["d"], s["topk"]
    q = torch.randn(B, H, N, d, device=dev, dtype=dtype)
    k = torch.randn(B, H, N, d, device=dev, dtype=dtype)
    scale = d ** -0.5
    fns = {"reference": lambda: reference.relation_targets(q, k, topk, scale),
           "eager_full_attention": lambda: full_attention_relation_targets(q, k, topk, scale)}
    if "triton" in providers:
        fast = _fast("relation_targets")
        fns["triton"] = lambda: fast(q, k, topk, scale)
    flops = 2 * B * H * (N - 1) * d * (2 + topk)  # ranking row + 1+k rows
    return Case(f"B={B},H={H},N={N},d={d},k={topk}", fns, flops=flops)


def relation_loss_cases(s, dtype, dev, providers, backward) -> Case:
    B, H, N, d, topk = s["B"], s["H"], s["L"] + 1, s["d"], s["topk"]
    q = torch.randn(B, H, N, d, device=dev, dtype=dtype, requires_grad=backward)
    k = torch.randn(B, H, N, d, device=dev, dtype=dtype, requires_grad=backward)
    idx = torch.rand(B, N - 1, device=dev).topk(topk, dim=1).indices
    target = torch.randn(B, 1 + topk, H, N - 1, device=dev)
    impls = {"reference": reference.relation_loss}
    if "triton" in providers:
        impls["triton"] = _fast("relation_loss")
    call = lambda f: f(q, k, idx, target, 1.8, d ** -0.5)  # noqa: E731
    rows_flops = 2 * B * H * (1 + topk) * (N - 1) * d
    if backward:
        fns = {n: _grad_fn(lambda f=f: call(f), [q, k], None) for n, f in impls.items()}
        return Case(f"B={B},H={H},N={N},d={d},k={topk}", fns, flops=3 * rows_flops)
    fns = {n: (lambda f=f: call(f)) for n, f in impls.items()}
    return Case(f"B={B},H={H},N={N},d={d},k={topk}", fns, flops=rows_flops)


def encoder_adapter_cases(s, dtype, dev, providers, backward) -> Case:
    from tec_fast.models.adapter import ADAPTER_LN_EPS, EncoderAdapter
    D, G, B, C, hidden = s["D"], s["G"], s["B"], s["C"], s["hidden"]
    T = s["K"] + 1
    module = EncoderAdapter(C, D, G, hidden).to(device=dev, dtype=dtype)
    feats = torch.randn(D, B, T, C, device=dev, dtype=dtype, requires_grad=backward)
    weights = module._weights()
    impls = {"reference": reference.encoder_adapter}
    if "triton" in providers:
        impls["triton"] = _fast("encoder_adapter")
    call = lambda f: f(feats, *weights, ADAPTER_LN_EPS, ADAPTER_LN_EPS)  # noqa: E731
    M = D // G
    fwd_flops = 2 * B * T * G * (M * C * C + 2 * C * hidden)
    if backward:
        grad = torch.randn(B, T, C, device=dev, dtype=dtype)
        fns = {n: _grad_fn(lambda f=f: call(f), [feats, *module.parameters()], grad) for n, f in impls.items()}
        return Case(f"D={D},G={G},B={B},T={T},C={C},hidden={hidden}", fns, flops=3 * fwd_flops)
    fns = {n: (lambda f=f: call(f)) for n, f in impls.items()}
    return Case(f"D={D},G={G},B={B},T={T},C={C},hidden={hidden}", fns, flops=fwd_flops)


def layer_norm_cases(s, dtype, dev, providers, backward) -> Case:
    """A block's norm2 with the attention branch's residual add: h = x + branch, y = LN(h)."""
    rows, C = s["B"] * (s["K"] + 1), s["C"]
    x = torch.randn(rows, C, device=dev, dtype=dtype, requires_grad=backward)
    res = torch.randn(rows, C, device=dev, dtype=dtype, requires_grad=backward)
    w = torch.randn(C, device=dev, dtype=dtype, requires_grad=backward)
    b = torch.randn(C, device=dev, dtype=dtype, requires_grad=backward)
    esize = x.element_size()
    impls = {"reference": lambda *a: reference.layer_norm(*a[:4], a[4])}
    if "triton" in providers:
        impls["triton"] = lambda *a: _fast("layer_norm")(*a[:4], residual=a[4])
    if backward:
        fns = {n: _grad_fn(lambda f=f: sum(o.float().sum() for o in f(x, w, b, 1e-6, res)), [x, res, w, b], None)
               for n, f in impls.items()}
        nbytes = (2 + 2 + 3 + 1) * rows * C * esize  # fwd: x, res in; y, h out. bwd: dy, dh, h in; dx out
    else:
        fns = {n: (lambda f=f: f(x, w, b, 1e-6, res)) for n, f in impls.items()}
        nbytes = 4 * rows * C * esize
    return Case(f"rows={rows},C={C}", fns, bytes_moved=nbytes)


def mlp_cases(s, dtype, dev, providers, backward) -> Case:
    """An encoder block's MLP (C -> 4C -> C over the visible tokens). GEMM-bound: TFLOP/s."""
    rows, C = s["B"] * (s["K"] + 1), s["C"]
    hidden = 4 * C
    x = torch.randn(rows, C, device=dev, dtype=dtype, requires_grad=backward)
    w1 = (torch.randn(hidden, C, device=dev, dtype=dtype) * C ** -0.5).requires_grad_(backward)
    b1 = torch.randn(hidden, device=dev, dtype=dtype, requires_grad=backward)
    w2 = (torch.randn(C, hidden, device=dev, dtype=dtype) * hidden ** -0.5).requires_grad_(backward)
    b2 = torch.randn(C, device=dev, dtype=dtype, requires_grad=backward)
    impls = {"reference": reference.mlp}
    if "triton" in providers:
        impls["triton"] = _fast("mlp")
    fwd_flops = 2 * 2 * rows * C * hidden
    if backward:
        grad = torch.randn(rows, C, device=dev, dtype=dtype)
        fns = {n: _grad_fn(lambda f=f: f(x, w1, b1, w2, b2), [x, w1, b1, w2, b2], grad) for n, f in impls.items()}
        return Case(f"rows={rows},C={C},hidden={hidden}", fns, flops=3 * fwd_flops)
    fns = {n: (lambda f=f: f(x, w1, b1, w2, b2)) for n, f in impls.items()}
    return Case(f"rows={rows},C={C},hidden={hidden}", fns, flops=fwd_flops)


def qkv_heads_cases(s, dtype, dev, providers, backward) -> Case:
    """An encoder block's q/k/v projection into heads (visible tokens), fp32 weights under
    autocast as trained; backward: x, weight and bias gradients from dq, dk, dv. GEMM FLOPs."""
    B, N, C, H = s["B"], s["K"] + 1, s["C"], s["H"]
    x = torch.randn(B, N, C, device=dev, requires_grad=backward)
    w = (torch.randn(3 * C, C, device=dev) * C ** -0.5).requires_grad_(backward)
    b = torch.zeros(3 * C, device=dev, requires_grad=backward)
    impls = {"reference": reference.qkv_heads}
    if "triton" in providers:
        impls["triton"] = _fast("qkv_heads")

    def call(f):
        with _autocast(dev, dtype):
            return f(x, w, b, H)
    flops = 2 * B * N * C * 3 * C
    shape = f"B={B},N={N},C={C},H={H}"
    if backward:
        grads = [torch.randn(B, H, N, C // H, device=dev, dtype=dtype) for _ in range(3)]
        fns = {n: _grad_fn(lambda f=f: call(f), [x, w, b], grads) for n, f in impls.items()}
        return Case(shape, fns, flops=3 * flops)
    return Case(shape, {n: (lambda f=f: call(f)) for n, f in impls.items()}, flops=flops)


def patch_embed_cases(s, dtype, dev, providers, backward) -> Case:
    """The new model's patch embedding as trained: fp32 images under autocast to ``dtype``, fp32
    weights; weight and bias gradients. GEMM FLOPs (the gather's bytes are a small part)."""
    B, p, D = s["B"], 16, s["C"]
    S = p * int(round(s["L"] ** 0.5))
    images = torch.randn(B, 3, S, S, device=dev)
    w = (torch.randn(D, 3, p, p, device=dev) * 0.02).requires_grad_(backward)
    b = torch.zeros(D, device=dev, requires_grad=backward)
    impls = {"reference": reference.patch_embed}
    if "triton" in providers:
        impls["triton"] = _fast("patch_embed")

    def call(f):
        with _autocast(dev, dtype):
            return f(images, w, b)
    flops = 2 * B * (S // p) ** 2 * 3 * p * p * D
    shape = f"B={B},S={S},p={p},D={D}"
    if backward:
        fns = {n: _grad_fn(lambda f=f: call(f).float().square().sum(), [w, b], None) for n, f in impls.items()}
        return Case(shape, fns, flops=2 * flops)
    return Case(shape, {n: (lambda f=f: call(f)) for n, f in impls.items()}, flops=flops)


BUILDERS = {
    "patch_embed": patch_embed_cases,
    "layer_norm": layer_norm_cases,
    "mlp": mlp_cases,
    "qkv_heads": qkv_heads_cases,
    "masked_gather": masked_gather_cases,
    "scatter_masked": scatter_masked_cases,
    "patch_norm_mse": patch_norm_mse_cases,
    "relation_targets": relation_targets_cases,
    "relation_loss": relation_loss_cases,
    "encoder_adapter": encoder_adapter_cases,
}


def copy_bandwidth(nbytes: int, dev: torch.device, warmup: int, reps: int,
                   cuda_graph: bool = False) -> Tuple[Dict, float]:
    """The device's copy bandwidth (read + write) on a buffer of ``nbytes``: the ceiling the
    gather / scatter kernels are compared with."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = time_callable(lambda: dst.copy_(src), dev, warmup=warmup, reps=reps, measure_memory=False,
                      cuda_graph=cuda_graph)
    return t, 2 * src.numel() / (t["median_ms"] * 1e-3) / 1e9


def run(op: str, size: dict, dtype: torch.dtype, dev: torch.device, providers: List[str],
        warmup: int, reps: int, cuda_graph: bool = False) -> List[Dict]:
    rows = []
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    for backward in (False, True):
        case = BUILDERS[op](size, dtype, dev, providers, backward)
        if case is None:
            continue
        bench = f"{op}_{'fwdbwd' if backward else 'fwd'}"
        results = {}
        for name, fn in case.providers.items():
            try:
                results[name] = time_callable(fn, dev, warmup=warmup, reps=reps, cuda_graph=cuda_graph)
            except torch.OutOfMemoryError:
                print(f"{bench} {name}: out of memory")
            except RuntimeError as exc:  # e.g. a provider that synchronises cannot be recorded
                if not cuda_graph:
                    raise
                print(f"{bench} {name}: not timed, cannot be recorded into a CUDA graph ({exc})")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        ref_ms = results.get("reference", {}).get("median_ms")
        for name, t in results.items():
            row = dict(bench=bench, provider=name, shape=case.shape, dtype=dtype_name,
                       timing="graph" if cuda_graph else "eager", **t)
            secs = t["median_ms"] * 1e-3
            if case.bytes_moved:
                row["gb_per_s"] = case.bytes_moved / secs / 1e9
            if case.flops:
                row["tflop_per_s"] = case.flops / secs / 1e12
            row["speedup"] = ref_ms / t["median_ms"] if ref_ms else None
            rows.append(row)
        if case.bytes_moved and dev.type == "cuda":
            t, gbs = copy_bandwidth(int(case.bytes_moved), dev, warmup, reps, cuda_graph)
            rows.append(dict(bench=bench, provider="device_copy", shape=case.shape, dtype=dtype_name,
                             timing="graph" if cuda_graph else "eager", **t, gb_per_s=gbs, speedup=None))
    return rows


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="all", choices=("all",) + OPS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: vitb on GPU, tiny on CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--provider", choices=("all", "reference", "triton"), default=None,
                   help="default: all on GPU (and on CPU with --interpret), reference on CPU")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the Triton kernels through TRITON_INTERPRET=1 (slow, for checking)")
    p.add_argument("--warmup", type=int, default=None, help="calls before timing (default 5 GPU, 1 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls (default 50 GPU, 5 CPU)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time each call replayed from a CUDA graph: the GPU time alone, without the "
                        "host's Python and launch time (rows carry timing=graph)")
    p.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    size = SIZES[args.size or ("vitb" if gpu else "tiny")]
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    provider = args.provider or ("all" if gpu or args.interpret else "reference")
    if args.cuda_graph and not gpu:
        p.error(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    if provider != "reference" and not gpu and not args.interpret:
        raise SystemExit("the Triton kernels need a CUDA device, or --interpret on CPU")
    providers = ["reference"] if provider == "reference" else ["reference", "triton"]
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    reps = args.reps if args.reps is not None else (50 if gpu else 5)
    ops = OPS if args.op == "all" else (args.op,)

    rows = []
    for op in ops:
        op_rows = run(op, size, dtype, dev, providers, warmup, reps, args.cuda_graph)
        if provider == "triton":
            op_rows = [r for r in op_rows if r["provider"] != "reference"]
        rows += op_rows
    print(f"device {device_name(dev)}; {dtype}; sizes {size}")
    print(format_table(rows, ["bench", "provider", "shape", "timing", "median_ms", "p20_ms", "p80_ms", "gb_per_s",
                              "tflop_per_s", "peak_mem_gb", "speedup"]))
    path = append_results(rows, args.results_dir, dev)
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
