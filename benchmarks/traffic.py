"""Traffic and memory model of one TEC training step, engine vs the eager baseline, on fake tensors.

One step = frozen base forward, new-model forward, backward, optimizer step, exactly as
``bench_step.py`` runs it on a GPU (engine: as ``fit`` runs it in one process: the base's GEMM
weights in bf16, the new model's cast in one multi-tensor kernel per step, bf16 autocast, the
``tec_fast`` custom ops, fused AdamW; baseline: ``baseline_eager.py`` under bf16 autocast, foreach AdamW as torch picks on
CUDA). It runs under ``FakeTensorMode``: shapes, dtypes and strides propagate, nothing is computed,
so ViT-L/16 at B=256 takes seconds on a CPU. A dispatch mode counts, for every kernel-level op:

* bytes read and written: each tensor argument read once (its distinct elements: an expanded
  tensor counts its stored elements), each output or mutated argument written once. A
  ``torch.ops.tec_fast.*`` custom op counts its own inputs and outputs and nothing inside it:
  exactly the traffic of the fused kernel. Gathers read as many source elements as they write.
* FLOPs of matmuls, convolutions and attention (``torch.utils.flop_counter`` formulas; the CPU
  flash-attention op and the custom ops by the formulas below); elementwise FLOPs are left out.
* kernel launches: one per op that moves bytes (views, ``empty`` and metadata ops are free; a
  foreach / fused-optimizer op is one launch).
* composite custom ops (the encoder adapter, forward and backward: cuBLAS GEMMs, torch ops and
  Triton kernels in sequence) are counted by what runs inside them: their implementation runs
  under the counter with each Triton launch recorded as one launch that reads or writes each of
  its tensor arguments once.
* peak live memory: every storage created during the step is tracked until it is freed
  (finalizers on the storages), above the resident parameters and optimizer state.
* host synchronisations: ops that need a value on the host (``item``, ``nonzero``, ...).

Why fake CPU tensors and two switches: a CPU build of torch cannot run autograd on fake CUDA
tensors (the engine aborts on a CUDA device guard), so the step runs on fake CPU tensors with
(1) ``TEC_FAST_KERNELS=triton`` + ``TRITON_INTERPRET=1`` so ``tec_fast.ops`` takes the custom ops
as it does on a GPU (their ``register_fake`` implementations run; no kernel is launched), and
(2) CUDA's autocast policy installed for the CPU autocast key: on CUDA, ``layer_norm``, ``exp``,
``pow`` ... run in fp32 and ``softmax``/``log_softmax``/``sum`` return fp32, where CPU autocast
would keep them in bf16. SDPA shows up as the CPU flash-attention op; its traffic (q, k, v, out,
logsumexp) is that of the CUDA flash kernel.

Roofline estimate per op: max(bytes / bandwidth, FLOPs / dense bf16 peak), summed over the step,
plus ``LAUNCH_US`` per launch. It is a lower bound for a perfect implementation of each kernel
(GEMMs at 100% of peak, every byte once), not a measurement.

    python -m benchmarks.traffic                    # ViT-B/16 and ViT-L/16, B=256
    python -m benchmarks.traffic --model vit_b --batch 128 --top 15
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry


from benchmarks.baseline_eager import EagerBase, EagerTEC
from benchmarks.bench_step import PRESETS, build
from benchmarks.common import append_jsonl, complete_row, format_table, make_parser, refuse_no_visible_patch
from tec_fast import BaseModel, TECModel
from tec_fast.cli.flags import POSITIVE, output_file, real
from tec_fast.training.precision import CastWeightsOnce, autocast_copy

# name: (HBM bandwidth B/s, dense bf16 peak FLOP/s), published figures of the SXM parts
HARDWARE = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}
# Per launch: the GPU-side gap plus minimum duration of a short kernel when the CPU runs ahead
# (CUDA-graph-like back-to-back launches); not the 5-10 us a CPU-bound launch costs.
LAUNCH_US = 2.0
MODELS = {"vit_b": "vit_base", "vit_l": "vit_large", "tiny": "tiny"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "traffic.jsonl")

aten = torch.ops.aten
# Ops that launch nothing: allocation, metadata, profiler markers.
FREE_OPS = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.new_empty_strided",
            "aten._unsafe_view", "aten.lift_fresh", "aten.detach", "aten.alias",
            "profiler._record_function_enter_new", "profiler._record_function_exit"}
# Ops that need a value on the host: a synchronisation on CUDA.
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero",
            "aten.masked_select", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim"}
WRITE_ONLY_FIRST = {"aten.copy_", "aten._foreach_copy_", "aten.fill_", "aten.zero_", "aten.uniform_", "aten.normal_"}
GATHERS = {"aten.gather", "aten.index_select", "aten.index", "aten.embedding"}
FUSED_OPTIMIZERS = {"aten._fused_adamw_", "aten._fused_adam_"}

# CUDA autocast's fp32 policies (aten/src/ATen/autocast_mode.cpp: AT_FORALL_FP32 and
# AT_FORALL_FP32_SET_OPT_DTYPE). Only ops CPU autocast has no rule for are installed.
CUDA_FP32_OPS = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
                 "reciprocal", "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
                 "softplus", "layer_norm", "native_layer_norm", "group_norm", "rms_norm", "logsumexp",
                 "cosine_similarity", "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div",
                 "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm")
CUDA_FP32_OPT_DTYPE_OPS = ("softmax.int", "log_softmax.int", "sum", "sum.dim_IntList", "prod", "prod.dim_int",
                           "cumsum", "cumprod", "linalg_vector_norm")


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a kernel touches in ``t`` (stride-0 dims stored once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(x) -> List[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def _bind(func, args, kwargs) -> Dict[str, object]:
    """Argument name -> value, by the op's schema."""
    bound = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
    return bound


def _sdpa_flops(q: torch.Tensor, k: torch.Tensor) -> float:
    """Forward FLOPs of attention: q k^T and p v, 2 * 2 * B*H * Nq * Nk * d."""
    *bh, nq, d = q.shape
    return 4.0 * math.prod(bh) * nq * k.shape[-2] * d


# vit_block's GEMMs and attention: 2 M N K per product (M x K, the first operand, times N)
_BLOCK_PRODUCTS: Dict[str, Callable[[Dict[str, object]], float]] = {
    "tec_fast.vit_block_linear": lambda b: 2.0 * b["x"].numel() * b["w"].shape[0],
    "tec_fast.vit_block_linear_dx": lambda b: 2.0 * b["dy"].numel() * b["w"].shape[1],
    "tec_fast.vit_block_gelu_grad": lambda b: 2.0 * b["dm"].numel() * b["w2"].shape[1],
    "tec_fast.vit_block_weight_grad": lambda b: 0.0 if b.get("w_dtype") is None else
    2.0 * b["dy"].numel() * b["x"].shape[1],
    "tec_fast.vit_block_weight_grads": lambda b: 2.0 * (b["dy0"].numel() * b["x0"].shape[1]
                                                        + b["dy1"].numel() * b["x1"].shape[1]),
    # 4 B H N^2 d = 4 B N^2 C (C = qkv's width / 3, = o's width); the backward 2.5x, as for torch's
    "tec_fast.vit_block_attention": lambda b: 4.0 * b["B"] * b["N"] ** 2 * b["qkv"].shape[1] / 3,
    "tec_fast.vit_block_attention_backward":
        lambda b: 10.0 * b["lse"].shape[0] * b["lse"].shape[2] ** 2 * b["o"].shape[1],
}


def _custom_op_flops(name: str, bound: Dict[str, object]) -> float:
    """Matmul FLOPs inside the engine's fused ops, from their argument shapes (0 for the
    bandwidth-bound ones). Backward ops compute input and weight gradients: 2x forward."""
    if name in _BLOCK_PRODUCTS:  # vit_block's GEMMs and attention
        return _BLOCK_PRODUCTS[name](bound)
    backward = name.endswith("_backward")
    base = name[:-len("_backward")] if backward else name
    if base in ("tec_fast.relation_loss", "tec_fast.relation_targets") and "q" in bound:
        B, H, N, d = bound["q"].shape
        rows = 1 + (bound["topk_idx"].shape[1] if "topk_idx" in bound else int(bound.get("topk", 0)))
        fwd = 2.0 * B * H * rows * N * d
    else:
        return 0.0
    return 2 * fwd if backward else fwd


CATEGORIES = (  # (name, ops) for the breakdown; first match wins
    ("GEMM / conv", {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul", "aten.convolution",
                     "aten.convolution_backward"}),
    ("attention (SDPA)", {"aten._scaled_dot_product_flash_attention_for_cpu",
                          "aten._scaled_dot_product_flash_attention_for_cpu_backward",
                          "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_flash_attention_backward",
                          "aten._scaled_dot_product_efficient_attention",
                          "aten._scaled_dot_product_efficient_attention_backward"}),
    ("eager softmax", {"aten._softmax", "aten._softmax_backward_data", "aten._log_softmax",
                       "aten._log_softmax_backward_data"}),
    ("dtype casts", {"aten._to_copy", "aten.to", "aten._foreach_copy_"}),
    ("LayerNorm", {"aten.native_layer_norm", "aten.native_layer_norm_backward"}),
    ("GELU", {"aten.gelu", "aten.gelu_backward"}),
    ("add / mul / div", {"aten.add", "aten.add_", "aten.mul", "aten.mul_", "aten.div", "aten.sub", "aten.neg"}),
    ("bias-grad / reductions", {"aten.sum", "aten.mean", "aten.var"}),
    ("layout copies", {"aten.clone", "aten.stack", "aten.cat", "aten.copy_", "aten.slice_backward",
                       "aten.select_backward", "aten.gather", "aten.scatter", "aten.index_select"}),
)


# The kernels a step cannot do without unless elementwise work moves into the GEMMs: see floor_ms
# (GELU: the eager baseline's).
FLOOR_CATEGORIES = {"GEMM / conv", "attention (SDPA)", "tec_fast fused ops", "GELU", "optimizer"}


def category(op: str) -> str:
    if op.startswith(("tec_fast.", "triton.")):  # custom ops, and Triton kernels inside composites
        return "tec_fast fused ops"
    named = next((name for name, ops in CATEGORIES if op in ops), None)  # e.g. _foreach_copy_: a cast
    if named is None and ("foreach" in op or "fused_adam" in op):
        return "optimizer"
    return named or "other"


@dataclass
class OpRecord:
    op: str
    phase: str
    read: int
    written: int
    flops: float
    launches: int


@dataclass
class StepCount:
    """What ``TrafficCounter`` saw during one step."""
    records: List[OpRecord] = field(default_factory=list)
    peak_bytes: int = 0
    saved_bytes: int = 0          # live when backward starts: what the forward saved (+ targets, loss)
    host_syncs: List[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(r.read + r.written for r in self.records)

    @property
    def flops(self) -> float:
        return sum(r.flops for r in self.records)

    @property
    def launches(self) -> int:
        return sum(r.launches for r in self.records)

    def custom_ops(self) -> List[str]:
        return sorted({r.op for r in self.records if r.op.startswith("tec_fast.")})

    def roofline_ms(self, bandwidth: float, peak: float, launch_us: float = LAUNCH_US) -> float:
        t = sum(max((r.read + r.written) / bandwidth, r.flops / peak) for r in self.records)
        return 1e3 * t + 1e-3 * launch_us * self.launches

    def floor_ms(self, bandwidth: float, peak: float, launch_us: float = LAUNCH_US) -> float:
        """``roofline_ms`` with every op outside ``FLOOR_CATEGORIES`` free: what removing all the
        glue (casts, adds, layout copies, reductions) and its launches could reach while the GEMMs
        stay library calls and the fused kernels and GELU passes keep their inputs and outputs in
        memory."""
        kept = [r for r in self.records if category(r.op) in FLOOR_CATEGORIES]
        t = sum(max((r.read + r.written) / bandwidth, r.flops / peak) for r in kept)
        return 1e3 * t + 1e-3 * launch_us * sum(r.launches for r in kept)

    def by_op(self, bandwidth: float, peak: float) -> List[Dict]:
        """One row per op name: calls, GB moved, GFLOP, roofline ms (no launch term), by bytes."""
        agg = defaultdict(lambda: dict(calls=0, gb=0.0, gflop=0.0, ms=0.0))
        for r in self.records:
            if not r.launches:
                continue
            a = agg[r.op]
            a["calls"] += 1
            a["gb"] += (r.read + r.written) / 1e9
            a["gflop"] += r.flops / 1e9
            a["ms"] += 1e3 * max((r.read + r.written) / bandwidth, r.flops / peak)
        rows = [dict(op=k, **v) for k, v in agg.items()]
        return sorted(rows, key=lambda r: -r["gb"])

    def by_category(self, bandwidth: float, peak: float) -> List[Dict]:
        """GB moved and roofline ms (no launch term) per kind of op, largest first."""
        agg = defaultdict(lambda: dict(calls=0, gb=0.0, ms=0.0))
        for r in self.records:
            a = agg[category(r.op)]
            a["calls"] += r.launches
            a["gb"] += (r.read + r.written) / 1e9
            a["ms"] += 1e3 * max((r.read + r.written) / bandwidth, r.flops / peak)
        return sorted((dict(category=k, **v) for k, v in agg.items()), key=lambda r: -r["gb"])

    def by_phase(self) -> Dict[str, Dict[str, float]]:
        out = defaultdict(lambda: dict(gb=0.0, gflop=0.0, launches=0))
        for r in self.records:
            p = out[r.phase]
            p["gb"] += (r.read + r.written) / 1e9
            p["gflop"] += r.flops / 1e9
            p["launches"] += r.launches
        return dict(out)


def _composite_ops() -> Dict[str, Callable]:
    """Custom ops that are not one fused kernel but a sequence of cuBLAS GEMMs, torch ops and
    Triton kernels: name -> their implementation, which the counter runs (Triton launches
    stubbed) to count what is inside instead of the op's inputs and outputs."""
    from tec_fast.kernels import encoder_adapter as ea
    return {"tec_fast.encoder_adapter": ea._adapter_fwd, "tec_fast.encoder_adapter_backward": ea._adapter_bwd}


def _launch_flops(name: str, args: tuple, kwargs: dict) -> float:
    """Matmul FLOPs of a recorded launch of ``vit_block``'s GEMM kernels (the encoder adapter's
    products): 2 K per element of each product (C [M, N] or a batch [G, M, N])."""
    if name == "_gemm_kernel" and kwargs.get("DOT", True):
        return 2.0 * args[2].numel() * args[9]
    if name == "_weight_grads_kernel":
        return 2.0 * (args[2].numel() + args[12].numel()) * args[21]
    return 0.0


def _triton_launches_recorded(counter: "TrafficCounter"):
    """Within the block a Triton kernel launch runs nothing and is recorded as one launch that
    reads or writes each of its tensor arguments once (the composites' LayerNorm and GEMM
    kernels; a tensor passed twice, as a GEMM's unused epilogue pointers are, counted once)."""
    from benchmarks.triton_stub import launches_stubbed

    def record(name, args, kwargs):
        tensors = {id(t): t for t in _tensors((args, kwargs))}
        nbytes = sum(tensor_bytes(t) for t in tensors.values())
        counter.count.records.append(OpRecord(f"triton.{name}", counter.phase, nbytes, 0,
                                              _launch_flops(name, args, kwargs), 1))
    return launches_stubbed(record)


class TrafficCounter(TorchDispatchMode):
    """Records bytes, FLOPs, launches and live storages of every op below autograd/autocast.
    Set ``phase`` to label what follows (the phase 'backward' also snapshots the live bytes)."""

    def __init__(self):
        super().__init__()
        self.count = StepCount()
        self._phase = "setup"
        self._live: Dict[int, int] = {}
        self._live_bytes = 0
        self.host_storages: set = set()  # storages that live on the host on a GPU too
        self._composites = _composite_ops()

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value == "backward":
            self.count.saved_bytes = self._live_bytes
        self._phase = value

    def _freed(self, key: int) -> None:
        self._live_bytes -= self._live.pop(key, 0)

    def _track(self, out) -> None:
        for t in _tensors(out):
            s = t.untyped_storage()
            key = id(s)
            if key in self._live:
                continue
            self._live[key] = s.nbytes()
            self._live_bytes += s.nbytes()
            weakref.finalize(s, self._freed, key)
        self.count.peak_bytes = max(self.count.peak_bytes, self._live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        inputs = _tensors((args, kwargs))
        if inputs and all(id(t.untyped_storage()) in self.host_storages for t in inputs):
            return func(*args, **kwargs)  # a host op on a GPU: no launch, no sync
        if name in SYNC_OPS:
            self.count.host_syncs.append(f"{name} ({self._phase})")
        out = func(*args, **kwargs)
        if func.namespace == "prim":
            return out
        self._track(out)
        impl = self._composites.get(name)
        if impl is not None:  # count what runs inside (the results above have the same metadata)
            with _triton_launches_recorded(self), self, torch.autocast("cpu", enabled=False):
                impl(*args, **kwargs)
            self.count.records.append(OpRecord(name, self._phase, 0, 0, 0.0, 0))  # that it ran
            return out
        returns = func._schema.returns
        is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        if is_view:  # may alias: ``aten.to`` (which reaches the counter inside a composite) copies
            in_storages = {id(t.untyped_storage()) for t in inputs}
            is_view = all(id(t.untyped_storage()) in in_storages for t in _tensors(out))
        if is_view or name in FREE_OPS:
            return out
        self.count.records.append(self._record(func, name, args, kwargs, out))
        return out

    def _record(self, func, name, args, kwargs, out) -> OpRecord:
        bound = _bind(func, args, kwargs)
        schema_args = {a.name: a for a in func._schema.arguments}
        read = written = 0
        in_storages = set()
        for arg_name, value in bound.items():
            ts = _tensors(value)
            mutated = schema_args[arg_name].alias_info is not None and schema_args[arg_name].alias_info.is_write
            first = arg_name == func._schema.arguments[0].name
            for t in ts:
                in_storages.add(id(t.untyped_storage()))
                nbytes = tensor_bytes(t)
                if name in GATHERS and first:
                    nbytes = min(nbytes, sum(tensor_bytes(o) for o in _tensors(out)))
                if not (mutated and first and name in WRITE_ONLY_FIRST):
                    read += nbytes
                if mutated and not (name in FUSED_OPTIMIZERS and arg_name == "grads"):
                    written += nbytes
        for t in _tensors(out):
            if id(t.untyped_storage()) not in in_storages:
                written += tensor_bytes(t)
        packet = func.overloadpacket
        if packet in flop_registry:
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
        elif packet is aten.matmul:  # reaches the counter undecomposed inside a composite op
            a = bound["self"]
            flops = 2.0 * _tensors(out)[0].numel() * a.shape[-1]
        elif packet is aten._scaled_dot_product_flash_attention_for_cpu:
            flops = _sdpa_flops(bound["query"], bound["key"])
        elif packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:
            flops = 2.5 * _sdpa_flops(bound["query"], bound["key"])  # dq, dk, dv, dp + recomputed q k^T
        else:
            flops = _custom_op_flops(name, bound)
        return OpRecord(name, self._phase, read, written, flops, 1)


# ---------------------------------------------------------------------------------------------
# The step on fake tensors
# ---------------------------------------------------------------------------------------------
def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _fp32_kernel(op, keys):
    def kernel(*args, **kwargs):
        cast = lambda t: t.float() if _eligible(t) else t  # noqa: E731
        args = [type(a)(cast(x) for x in a) if isinstance(a, (list, tuple)) else cast(a) for a in args]
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return op(*args, **{k: cast(v) for k, v in kwargs.items()})
    return kernel


def _fp32_opt_dtype_kernel(op, keys):
    names = [a.name for a in op._schema.arguments]
    i = names.index("dtype")
    kwarg_only = op._schema.arguments[i].kwarg_only

    def kernel(*args, **kwargs):
        args = list(args)
        if _eligible(args[0]):
            if kwarg_only or len(args) <= i:
                kwargs.setdefault("dtype", None)
                if kwargs["dtype"] is None:
                    kwargs["dtype"] = torch.float32
            elif args[i] is None:
                args[i] = torch.float32
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return op(*args, **kwargs)
    return kernel


def _has_autocast(qualname: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


@contextlib.contextmanager
def cuda_autocast_policy():
    """Make CPU autocast follow CUDA's rules, scoped (the registrations go on exit): ops with a
    CPU autocast rule and no CUDA one (``cat``/``stack`` promotion, the CPU fp32 list) fall
    through, and the fp32 rules CUDA has and CPU lacks (``layer_norm``, ``softmax``, ...) are
    installed on the CPU autocast key."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for qual in torch._C._dispatch_get_all_op_names():
                if qual.startswith("aten::") and _has_autocast(qual, "AutocastCPU") \
                        and not _has_autocast(qual, "AutocastCUDA"):
                    lib.impl(qual[len("aten::"):], torch.library.fallthrough_kernel, "AutocastCPU")
            for names, make in ((CUDA_FP32_OPS, _fp32_kernel), (CUDA_FP32_OPT_DTYPE_OPS, _fp32_opt_dtype_kernel)):
                for qual in names:
                    packet, _, overload = qual.partition(".")
                    op = getattr(getattr(aten, packet), overload or "default")
                    if _has_autocast(op.name(), "AutocastCUDA") and not _has_autocast(op.name(), "AutocastCPU"):
                        lib.impl(qual, make(op, keys), "AutocastCPU")
        yield
    finally:
        lib._destroy()


@contextlib.contextmanager
def fused_kernel_path():
    """``tec_fast.ops`` takes the Triton custom ops on CPU tensors (on fake tensors only their
    fake implementations run)."""
    from tec_fast.ops.dispatch import reload_environment  # tec_fast reads these once: re-read
    saved = {k: os.environ.get(k) for k in ("TEC_FAST_KERNELS", "TRITON_INTERPRET")}
    os.environ.update(TEC_FAST_KERNELS="triton", TRITON_INTERPRET="1")
    reload_environment()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_environment()


def to_fake(module: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace a meta-device module's parameters and buffers by fake CPU tensors (inside the
    active FakeTensorMode), optionally cast to ``dtype``; shared parameters stay shared."""
    memo = {}
    for sub in module.modules():
        for n, p in list(sub._parameters.items()):
            if p is not None:
                if p not in memo:
                    t = torch.empty_strided(p.shape, p.stride(), dtype=dtype or p.dtype)
                    memo[p] = nn.Parameter(t, requires_grad=p.requires_grad)
                sub._parameters[n] = memo[p]
        for n, b in list(sub._buffers.items()):
            if b is not None:
                cast = dtype if dtype is not None and b.is_floating_point() else b.dtype
                sub._buffers[n] = torch.empty_strided(b.shape, b.stride(), dtype=cast)
    return module


def _init_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """The state of a step that is not the first (exp_avg, exp_avg_sq, step), outside the count."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def count_step(provider: str, preset: str, batch: int, mask_ratio: float = 0.75) -> StepCount:
    """Run one training step of ``provider`` ('engine' or 'eager') on fake tensors; return its count."""
    bvit, cfg, topk = build(preset, torch.device("meta"))
    with torch.device("meta"):
        if provider == "engine":  # as the trainer and bench_step run it: the frozen base's GEMM
            # weights stored in bf16 (autocast_copy), not cast at every step
            base, model = autocast_copy(BaseModel(bvit, topk=topk), torch.bfloat16), TECModel(cfg)
        elif provider == "eager":
            base, model = EagerBase(bvit, topk=topk).eval(), EagerTEC(cfg)
        else:
            raise ValueError(f"provider must be 'engine' or 'eager', got {provider!r}")
    counter = TrafficCounter()
    with warnings.catch_warnings(), fused_kernel_path(), cuda_autocast_policy(), FakeTensorMode():
        warnings.simplefilter("ignore")
        if provider == "engine":  # fused AdamW
            base, model = to_fake(base), to_fake(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
            call = CastWeightsOnce(model, torch.bfloat16)  # as fit calls it in one process
        else:  # the public code: fp32 modules under autocast, torch's CUDA default (foreach) AdamW
            base, model = to_fake(base), to_fake(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)
            call = model
        _init_optimizer_state(model, opt)
        if not opt.defaults.get("fused") and not opt.defaults.get("capturable"):
            # torch keeps these optimizers' step counters on the CPU, also for CUDA parameters
            counter.host_storages = {id(s["step"].untyped_storage()) for s in opt.state.values()}
        images = torch.empty(batch, 3, bvit.img_size, bvit.img_size)
        with counter:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                counter.phase = "base forward"
                with torch.no_grad():
                    targets = base(images)
                counter.phase = "forward"
                loss = call(images, targets, mask_ratio=mask_ratio)["loss"]
            counter.phase = "backward"
            loss.backward()
            counter.phase = "optimizer"
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, targets
    return counter.count


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def summarize(count: StepCount) -> Dict:
    row = dict(gb_read=sum(r.read for r in count.records) / 1e9,
               gb_written=sum(r.written for r in count.records) / 1e9,
               gb_moved=count.bytes / 1e9, gflop=count.flops / 1e9, launches=count.launches,
               peak_act_gb=count.peak_bytes / 1e9, saved_act_gb=count.saved_bytes / 1e9,
               host_syncs=len(count.host_syncs), custom_ops=count.custom_ops(),
               by_phase=count.by_phase())
    for hw, (bw, peak) in HARDWARE.items():
        row[f"est_ms_{hw.lower()}"] = count.roofline_ms(bw, peak)
        row[f"est_ms_{hw.lower()}_no_launch"] = count.roofline_ms(bw, peak, 0.0)
        row[f"floor_ms_{hw.lower()}"] = count.floor_ms(bw, peak)
    return row


def run(model: str, batch: int, mask_ratio: float = 0.75, top: int = 10) -> List[Dict]:
    preset = MODELS[model]
    bvit, cfg, topk = build(preset, torch.device("meta"))
    shape = f"B={batch},S={bvit.img_size},p={bvit.patch_size},C={cfg.encoder.embed_dim},D={cfg.encoder.depth}"
    rows = []
    for provider in ("engine", "eager"):
        count = count_step(provider, preset, batch, mask_ratio)
        bw, peak = HARDWARE["H200"]
        row = dict(bench="traffic", label="estimate", provider=provider, model=model, preset=preset,
                   batch=batch, shape=shape, dtype="bf16-amp", mask_ratio=mask_ratio, topk=topk,
                   device="fake-tensors (roofline estimate, no device)", launch_us=LAUNCH_US,
                   hardware={k: dict(bandwidth_tb_s=v[0] / 1e12, peak_tflops=v[1] / 1e12)
                             for k, v in HARDWARE.items()},
                   **summarize(count),
                   top_ops_h200=[dict(r, gb=round(r["gb"], 4), gflop=round(r["gflop"], 2), ms=round(r["ms"], 4))
                                 for r in count.by_op(bw, peak)[:top]],
                   categories_h200=[dict(r, gb=round(r["gb"], 4), ms=round(r["ms"], 4))
                                    for r in count.by_category(bw, peak)],
                   host_sync_ops=count.host_syncs)
        rows.append(row)
    eng, eag = rows
    for key in ("gb_moved", "gflop", "launches", "peak_act_gb", "est_ms_h100", "est_ms_h200"):
        eng[f"ratio_{key}"] = eng[key] / eag[key] if eag[key] else None
    for hw in HARDWARE:  # the floor against what eager is estimated to take
        key = f"floor_ms_{hw.lower()}"
        eng[f"ratio_{key}"] = eng[key] / eag[f"est_ms_{hw.lower()}"]
    return rows


def print_report(rows: List[Dict], top: int = 10) -> None:
    cols = ["provider", "gb_moved", "gflop", "launches", "peak_act_gb", "saved_act_gb",
            "est_ms_h100", "est_ms_h200"]
    by_model = defaultdict(list)
    for r in rows:
        by_model[(r["model"], r["shape"])].append(r)
    for (model, shape), rs in by_model.items():
        eng = next(r for r in rs if r["provider"] == "engine")
        ratio = dict(provider="engine/eager", **{c: eng.get(f"ratio_{c}") for c in cols[1:]})
        print(f"\n{model} {shape} bf16 autocast, one training step. ESTIMATE (fake tensors, roofline "
              f"max(bytes/BW, FLOPs/989 TFLOP/s) per op + {LAUNCH_US:g} us per launch):")
        print(format_table(rs + [ratio], cols))
        eag = next(r for r in rs if r["provider"] == "eager")
        print("engine floor, every op but the GEMMs, attention, fused ops, GELU and optimizer free: "
              + ", ".join(f"{hw} {eng[f'floor_ms_{hw.lower()}']:.1f} ms "
                          f"({eng[f'floor_ms_{hw.lower()}'] / eag[f'est_ms_{hw.lower()}']:.3f} of eager)"
                          for hw in HARDWARE))
        print(f"engine custom ops: {', '.join(eng['custom_ops']) or 'NONE'}; host syncs: engine "
              f"{eng['host_syncs']}, eager {next(r for r in rs if r['provider'] == 'eager')['host_syncs']}")
        cats = {r["provider"]: {c["category"]: c for c in r["categories_h200"]} for r in rs}
        names = sorted(set(cats["engine"]) | set(cats["eager"]), key=lambda n: -cats["eager"].get(n, {}).get("gb", 0))
        print("\nGB moved by kind of op (H200 roofline ms without launch overhead):")
        print(format_table([dict(category=n, **{f"{p}_{k}": cats[p].get(n, {}).get(k) for p in ("engine", "eager")
                                                for k in ("gb", "ms")}) for n in names],
                           ["category", "engine_gb", "engine_ms", "eager_gb", "eager_ms"]))
        for r in rs:
            print(f"\n{r['provider']}: top {top} ops by bytes (H200 roofline ms without launch overhead)")
            print(format_table(r["top_ops_h200"][:top], ["op", "calls", "gb", "gflop", "ms"]))


def main(argv=None) -> List[Dict]:
    p = make_parser("traffic", __doc__)
    p.add_argument("--model", choices=sorted(MODELS), nargs="+", default=["vit_b", "vit_l"],
                   help="vit_b: ViT-B/16 (base ViT-B/16, decoder 512x2); vit_l: ViT-L/16 (decoder 768x2); "
                        "tiny: the test size")
    p.add_argument("--batch", type=POSITIVE, default=256, help="images per step (default 256)")
    p.add_argument("--mask-ratio", type=real(0, 1, lo_open=True, hi_open=True), default=0.75,
                   help="share of the patches hidden from the encoder, in (0, 1) (default 0.75)")
    p.add_argument("--top", type=POSITIVE, default=10, help="ops listed per provider, by bytes (default 10)")
    p.add_argument("--results", default=RESULTS, type=output_file,
                   help="JSON-lines file rows are appended to (default benchmarks/results/traffic.jsonl)")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args(argv)
    for model in args.model:
        refuse_no_visible_patch(p, "--mask-ratio", args.mask_ratio, PRESETS[MODELS[model]][1].num_patches,
                                f"model {model}")
    rows = []
    for model in args.model:
        rows += run(model, args.batch, args.mask_ratio, args.top)
    print_report(rows, args.top)
    if not args.no_save:
        append_jsonl([complete_row(r, "cpu") for r in rows], args.results)
        print(f"\nrows appended to {args.results}")
    return rows


if __name__ == "__main__":
    main()
