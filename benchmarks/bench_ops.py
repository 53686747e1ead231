"""Per-op benchmarks: the Triton kernels against the eager reference, in the same process.

Every op of the registry (``tec_fast.ops.registry.OPS``) is benchmarked on its registry example
at the chosen size (``SIZES``: ViT-B/16 sizes on a GPU, tiny ones on CPU): forward, and forward +
backward where the op has gradients (the example says which inputs get them). Per call: median /
p20 / p80 ms, achieved GB/s or TFLOP/s from the row's ``work`` (the bytes or FLOPs one call must
at least move / do), peak memory, and the speedup over the plain-torch reference
(``tec_fast.ops.reference.<op>``; for relation_targets also the full-attention route the public
code takes: all N x N logits, then the rows). A device copy (``clone``) of the same bytes gives
the bandwidth the memory-bound kernels are measured against. Appends JSON lines to
``<results-dir>/<device>.jsonl``; ``benchmarks/dispatch_table.py`` turns a GPU's rows into the
table ``TEC_FAST_KERNELS=auto`` follows there. A new op needs no change here.

    python -m benchmarks.bench_ops --op all --device cuda            # ViT-B/16 sizes, bf16
    python -m benchmarks.bench_ops --op relation_loss --device cuda --dtype fp32
    python -m benchmarks.bench_ops --op all --device cpu             # tiny sizes, reference only
    python -m benchmarks.bench_ops --op all --device cpu --interpret # + Triton via the interpreter
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

# the interpreter must be on before any Triton kernel is defined
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from benchmarks.common import (DTYPES, append_results, default_device, device_arg, device_name,  # noqa: E402
                               exit_if_failed, format_table, make_parser, progress, provider_failed, results_dir,
                               time_callable)
from tec_fast.cli.flags import NON_NEGATIVE, POSITIVE  # noqa: E402
from tec_fast.ops import reference  # noqa: E402
from tec_fast.ops.dispatch import fast_impl  # noqa: E402
from tec_fast.ops.registry import OPS as OP_TABLE  # noqa: E402
from tec_fast.ops.registry import SIZES, outputs, unit_grads  # noqa: E402

OPS = tuple(OP_TABLE)


class Case:
    """One op at one size: providers (name -> zero-argument callable), the bytes / FLOPs one
    call must at least move / do, and a label of the shape."""

    def __init__(self, shape: str, providers: Dict[str, Callable[[], object]],
                 bytes_moved: Optional[float] = None, flops: Optional[float] = None):
        self.shape, self.providers, self.bytes_moved, self.flops = shape, providers, bytes_moved, flops


def full_attention_relation_targets(q, k, topk, scale):
    """The public code's route: all N x N logits of every head, then the CLS row and top-k rows."""
    B, H, N, d = q.shape
    attn = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, N, N]
    idx = attn[:, :, 0, 1:].mean(1).topk(topk, dim=1).indices
    rows = torch.cat([torch.zeros_like(idx[:, :1]), idx + 1], 1)
    rel = torch.gather(attn[..., 1:], 2, rows[:, None, :, None].expand(B, H, 1 + topk, N - 1))
    return rel.permute(0, 2, 1, 3).contiguous(), idx


# Providers beyond the reference and Triton for an op (optional; a new op needs none)
EXTRA_PROVIDERS = {"relation_targets": {"eager_full_attention": full_attention_relation_targets}}


def build_case(op: str, size: dict, dtype: torch.dtype, dev: torch.device, providers: List[str],
               backward: bool) -> Optional[Case]:
    """The registry example of ``op`` as timed callables (None: no backward to time)."""
    spec = OP_TABLE[op]
    torch.manual_seed(0)
    ex = spec.example(size, dtype, dev)
    if backward and not ex.grad_of:
        return None
    impls = {"reference": getattr(reference, op), **EXTRA_PROVIDERS.get(op, {})}
    if "triton" in providers:
        impls["triton"] = fast_impl(op)
    if backward:
        def timed(f):
            def run():
                outs = outputs(f(*ex.args, **ex.kwargs))
                return torch.autograd.grad(outs, ex.grad_of, unit_grads(outs), allow_unused=True)
            return run
        impls.pop("eager_full_attention", None)
    else:
        def timed(f):
            return lambda: f(*ex.args, **ex.kwargs)
    work = spec.work(ex, backward) if spec.work else {}
    return Case(ex.shape, {name: timed(f) for name, f in impls.items()},
                bytes_moved=work.get("bytes"), flops=work.get("flops"))


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
        warmup: int, reps: int, cuda_graph: bool = False, failures: Optional[List[str]] = None,
        started: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Rows of ``op``'s forward and forward + backward, each provider timed. A provider that
    raises is reported and listed in ``failures`` (the other providers and ops still run: on a
    lent GPU one broken op must not cost the rows of the rest); without ``failures`` it raises.
    ``started`` is told each pass (``layer_norm fwd+bwd B=256,T=50,C=768``) before it is timed."""
    rows = []
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    for backward in (False, True):
        case = build_case(op, size, dtype, dev, providers, backward)
        if case is None:
            continue
        bench = f"{op}_{'fwdbwd' if backward else 'fwd'}"
        if started is not None:
            started(f"{op} {'fwd+bwd' if backward else 'fwd'} {case.shape}")
        results = {}
        for name, fn in case.providers.items():
            try:
                results[name] = time_callable(fn, dev, warmup=warmup, reps=reps, cuda_graph=cuda_graph)
            except torch.OutOfMemoryError:
                print(f"{bench} {name}: out of memory")
            except Exception as exc:  # Triton's compile / out-of-resources errors are not RuntimeErrors
                if not (cuda_graph and isinstance(exc, RuntimeError)):
                    if failures is None:
                        raise
                    provider_failed(failures, f"{bench} {name}", exc)
                else:  # e.g. a provider that synchronises
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
    p = make_parser("bench_ops", __doc__)
    p.add_argument("--op", default="all", choices=("all",) + OPS,
                   help="the op of tec_fast.ops.registry to time, or all of them (default all)")
    p.add_argument("--device", type=device_arg, default=default_device(),
                   help="cpu, cuda or cuda:N (default: cuda where there is one, else cpu)")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: vitb on GPU, tiny on CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--provider", choices=("all", "reference", "triton"), default=None,
                   help="default: all on GPU (and on CPU with --interpret), reference on CPU")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the Triton kernels through TRITON_INTERPRET=1 (slow, for checking)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=None, help="calls before timing (default 5 GPU, 1 CPU)")
    p.add_argument("--reps", type=POSITIVE, default=None, help="timed calls (default 50 GPU, 5 CPU)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time each call replayed from a CUDA graph: the GPU time alone, without the "
                        "host's Python and launch time (rows carry timing=graph)")
    p.add_argument("--results-dir", type=results_dir,
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder the rows are appended to, as <device>.jsonl (made if missing; "
                        "default benchmarks/results)")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    size = SIZES[args.size or ("vitb" if gpu else "tiny")]
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    provider = args.provider or ("all" if gpu or args.interpret else "reference")
    if args.cuda_graph and not gpu:
        p.error(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    if provider != "reference" and not gpu and not args.interpret:
        p.refuse("--provider", f"{provider}: the Triton kernels need a CUDA device, or --interpret on CPU")
    providers = ["reference"] if provider == "reference" else ["reference", "triton"]
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    reps = args.reps if args.reps is not None else (50 if gpu else 5)
    ops = OPS if args.op == "all" else (args.op,)

    rows, failures, path = [], [], None
    for i, op in enumerate(ops):
        op_rows = run(op, size, dtype, dev, providers, warmup, reps, args.cuda_graph, failures,
                      started=lambda what, i=i: progress(i + 1, len(ops), what))
        if provider == "triton":
            op_rows = [r for r in op_rows if r["provider"] != "reference"]
        if op_rows:  # written op by op: a run cut short (a lent GPU's time cap) keeps what it measured
            path = append_results(op_rows, args.results_dir, dev)
        rows += op_rows
    print(f"device {device_name(dev)}; {dtype}; sizes {size}")
    print(format_table(rows, ["bench", "provider", "shape", "timing", "median_ms", "p20_ms", "p80_ms", "gb_per_s",
                              "tflop_per_s", "peak_mem_gb", "speedup"]))
    print(f"appended {len(rows)} rows to {path}" if path else "no rows to append")
    exit_if_failed(failures)
    return rows


if __name__ == "__main__":
    main()
