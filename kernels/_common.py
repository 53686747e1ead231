"""Launch helpers shared by the kernel files (host side, and ``next_match``, a device function).

Every op wires its kernels the same way (host cost per call is what the GPU waits for at small
batches; ``benchmarks/host_overhead.py`` measures it): a ``torch.autograd.Function`` whose
forward and backward call the op's launchers directly in eager mode, and the same launchers
registered as ``torch.library`` custom ops with fake implementations, which the Function calls
instead under ``torch.compile`` / export or a dispatch mode (``direct_launch``), so tracers see
one opaque op per launcher. Launch configurations depend on sizes only and are cached; the
integer helpers here are plain Python (``triton.cdiv`` and ``triton.next_power_of_2`` are
``constexpr_function`` objects that cost microseconds per host call).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@triton.jit
def next_match(idx_row, n, targets, after, ok, BLOCK_N: tl.constexpr):
    """Per element of ``targets`` (where ``ok``): (the first position p > ``after`` in [0, n) with
    ``idx_row[p] == target``, or n; how many such positions there are). ``idx_row``: n indices,
    read in blocks of BLOCK_N (a [len(targets), BLOCK_N] comparison per block). What the backward
    kernels of the index ops use to invert their gather: the rows of the gradient a row of the
    input's gradient sums, in ascending order, with no sort of the indices and no atomics."""
    first = tl.zeros_like(targets).to(tl.int32) + n
    count = tl.zeros_like(first)
    for p0 in range(0, n, BLOCK_N):
        ps = p0 + tl.arange(0, BLOCK_N)
        v = tl.load(idx_row + ps, mask=ps < n, other=-1)
        hit = (v[None, :] == targets[:, None]) & (ps[None, :] > after[:, None]) & ok[:, None]
        first = tl.minimum(first, tl.min(tl.where(hit, ps[None, :], n), axis=1))
        count += tl.sum(hit.to(tl.int32), axis=1)
    return first, count


def match_block(n: int, cap: int) -> int:
    """BLOCK_N of ``next_match`` over n indices: at most ``cap`` (the comparison tile's columns,
    chosen per kernel with ``benchmarks/compile_report.py``: wider tiles made ptxas spill)."""
    return max(16, min(next_pow2(n), cap))


@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, n_parts, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    acc = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + pp[:, None].to(tl.int64) * N + cols[None, :],
                       mask=(pp[:, None] < n_parts) & ok[None, :], other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _sum_parts_config(n_parts: int, N: int) -> Tuple[int, int, int]:
    block_n = min(next_pow2(max(N, 1)), 256)
    block_p = max(1, min(next_pow2(n_parts), 4096 // block_n))
    return block_p, block_n, cdiv(N, block_n)


def slice_partials(n_slices: int, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Where a backward kernel that splits the batch into ``n_slices`` slices writes a parameter's
    gradient of ``shape``: the gradient itself, in ``dtype``, when one slice covers the batch;
    else fp32 partials [n_slices, *shape] for ``added_slices``."""
    if n_slices == 1:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty((n_slices, *shape), dtype=torch.float32, device=device)


def added_slices(part: torch.Tensor, n_slices: int, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The gradient in a ``slice_partials`` buffer: the buffer itself for one slice, else the sum
    of the partials (``sum_parts``)."""
    return part if n_slices == 1 else sum_parts(part, shape, dtype)


def sum_parts(parts: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new ``shape`` tensor of ``dtype``: the sum over the first dimension of the contiguous fp32
    per-program partials ``parts`` [P, *shape], in one launch (what ``parts.sum(0).to(dtype)``
    gives, two or three torch calls on the host in a backward). P == 0 gives zeros."""
    out = torch.empty(shape, dtype=dtype, device=parts.device)
    n_parts, N = parts.shape[0], out.numel()
    if N:
        block_p, block_n, grid = _sum_parts_config(n_parts, N)
        launch(_sum_parts_kernel, (grid,), parts, out, n_parts, N, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)
    return out


# ---- launching ------------------------------------------------------------------------------
#
# Triton's ``JITFunction.run`` spends most of a launch's host time before the launch: binding and
# specialising every argument, hashing that into a cache key, looking the compiled kernel up,
# reading its option knobs, the stream, its hooks and the globals the kernel used (about 8.7 us
# of a launch here: ``benchmarks/experiments/launch_path_split.py``). ``launch`` keeps, per
# kernel and per *call signature* (each tensor's dtype and address modulo 16, every other
# argument's class and value, the constexprs and options, the driver and device, Triton's option
# knobs), the compiled kernel ``JITFunction.run`` chose the first time, and later calls with the
# same signature hand the same arguments to that kernel's launcher directly. The signature is
# finer than what Triton specialises on (dtype and 16-byte alignment of a pointer; an int's
# 32/64-bit range, its divisibility by 16 and whether it is 1), so it always picks the kernel
# Triton would pick; and the launcher call is the one ``JITFunction.run`` makes. What a reuse
# skips besides: Triton's check that the globals a kernel read have not changed since it
# compiled (the kernels here read only module constants). Not taken (Triton's own path runs):
# under the interpreter, with a launch hook or a pre-run hook installed (profilers), with a custom
# pass pipeline (Triton 3.9's stages hook, which changes the kernel compiled), for a grid given
# as a function, when ``JITFunction.run`` has been replaced (the benchmarks' compile-only and
# launch stubs), on a Triton version the reuse was not checked against, or with
# ``TEC_FAST_LAUNCH=0``; a launch that a JIT cache hook declines (nothing compiled) is not kept.
# ``TEC_FAST_LAUNCH=verify`` checks every reuse against Triton's own choice (tests).
#
# The signature is computed by a function written for the kernel's arguments: one expression per
# positional argument, for the kinds (tensor or not) its first launch passed (``_key_function``);
# about half the host time of a loop over the arguments. Arguments of other kinds (a different
# count, a tensor where there was none or the reverse) miss the table and give the kernel a new
# key function.

_LAUNCH_SETTINGS = {}   # TEC_FAST_LAUNCH, read once
_JIT_RUN = JITFunction.run  # Triton's own; a replaced one (a benchmark's stub) is always called
_KERNELS = {}           # id(kernel) -> _Launches (which holds the kernel: its id is not reused while listed)
_Tensor = torch.Tensor
_MAX_LAUNCHES = 4096    # signatures kept per kernel before its table starts over (sizes that vary every call)


# Triton versions whose JITFunction.run this reuse was checked against (its launcher call, its
# specialisation rules: tests/ops/test_launch_reuse.py run under each; 3.6 is what the H200
# measured in docs/performance.md ran); any other version launches through JITFunction.run
_REUSE_TRITON = ("3.6", "3.9")
# option knobs JITFunction.run reads into a kernel's options on one version and not the other
_HAS_FPSAN = hasattr(knobs.compilation, "fpsan_homomorphic_casts")  # 3.9, not 3.6
_HAS_STAGES_HOOK = hasattr(knobs.runtime, "add_stages_inspection_hook")  # 3.9: a custom pipeline


def launch_mode() -> str:
    """``TEC_FAST_LAUNCH``: ``1`` (default) reuse compiled kernels by call signature, ``0`` always
    Triton's ``JITFunction.run``, ``verify`` reuse and check each reuse against Triton's choice.
    ``0`` as well on a Triton version the reuse was not checked against."""
    mode = _LAUNCH_SETTINGS.get("mode")
    if mode is None:
        mode = os.environ.get("TEC_FAST_LAUNCH", "1").strip().lower() or "1"
        if mode not in ("0", "1", "verify"):
            raise ValueError(f"TEC_FAST_LAUNCH must be 0, 1 or verify, got {mode!r}")
        if ".".join(triton.__version__.split(".")[:2]) not in _REUSE_TRITON:
            mode = "0"
        _LAUNCH_SETTINGS["mode"] = mode
    return mode


def launch_path() -> str:
    """How ``launch`` reaches a kernel's launcher, in words (``python -m tec_fast.info``)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "Triton's interpreter (TRITON_INTERPRET is set)"
    mode = launch_mode()
    if mode == "0":
        why = ("TEC_FAST_LAUNCH=0" if os.environ.get("TEC_FAST_LAUNCH", "1").strip() == "0" else
               f"triton {triton.__version__}: reuse checked on {', '.join(_REUSE_TRITON)} only")
        return f"Triton's JITFunction.run on every launch ({why})"
    return ("compiled kernels reused by call signature, launched through their own launcher"
            + (" (each reuse checked against Triton's choice)" if mode == "verify" else ""))


def forget_launches() -> None:
    """Empty every kernel's reuse table (a benchmark's stubbed kernels must not be reused later)."""
    _KERNELS.clear()


_HookChain = knobs.HookChain


def _hook_idle(hook) -> bool:
    return hook is None or (type(hook) is _HookChain and not hook.calls)


class LaunchConfig:
    """A kernel's constexprs and launch options for one configuration, built once by a cached
    configuration function and handed to ``launch_with`` whole: no keyword dictionary is built
    per launch (about 0.6 us of a call with a dozen keywords here), and the reuse key holds the
    object itself, hashed by identity, in place of its items. Its identity stands for its
    contents: it is never changed after it is built, and whoever keys on it keeps it alive (the
    cache that made it, the reuse table), so no other object can take its identity."""
    __slots__ = ("meta",)

    def __init__(self, **meta):
        self.meta = meta

    def __repr__(self) -> str:
        return f"LaunchConfig({', '.join(f'{k}={v!r}' for k, v in self.meta.items())})"


def launch(kernel, grid: Tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``: through the compiled kernel's own launcher when this call
    signature was launched before (see above), else through ``JITFunction.run``."""
    _launch(kernel, grid, args, meta, None)


def launch_with(kernel, grid: Tuple[int, ...], config: LaunchConfig, *args) -> None:
    """``launch`` with the constexprs and options of ``config`` (the hot launchers' form)."""
    _launch(kernel, grid, args, config.meta, config)


def _launch(kernel, grid: Tuple[int, ...], args: tuple, meta: dict, config: Optional[LaunchConfig]) -> None:
    mode = _LAUNCH_SETTINGS.get("mode") or launch_mode()
    runtime = knobs.runtime
    if not (type(kernel) is JITFunction and JITFunction.run is _JIT_RUN and mode != "0" and type(grid) is tuple
            and _hook_idle(runtime.launch_enter_hook) and _hook_idle(runtime.launch_exit_hook)
            and not kernel.pre_run_hooks and not (_HAS_STAGES_HOOK and runtime.add_stages_inspection_hook)):
        # the interpreter, a benchmark's stub, a profiler, or a custom pass pipeline
        kernel.run(*args, grid=grid, warmup=False, **meta)
        return
    active = driver.active
    device = active.get_current_device()
    compilation = knobs.compilation
    head = (active, device, runtime.debug, compilation.instrumentation_mode,
            compilation.fpsan_homomorphic_casts if _HAS_FPSAN else None)
    options = config if config is not None else tuple(meta.items())  # what the key holds of them
    entry = _KERNELS.get(id(kernel))
    hit = None
    if entry is not None:
        try:
            hit = entry.table.get(entry.key_of(head, options, *args))
        except (AttributeError, TypeError):  # arguments of other kinds than the key function's, or unhashable
            hit = None
    if hit is None:
        compiled = kernel.run(*args, grid=grid, warmup=False, **meta)
        _remember(kernel, entry, head, compiled, args, meta, options)
        return
    compiled, tail = hit
    if mode == "verify":
        _verify_reuse(kernel, grid, args, meta, device, compiled, tail)
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(device),
                 compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)


class _Launches:
    """One kernel's reuse table (call signature -> (compiled kernel, the arguments after the
    positional ones)) and the key function for the argument kinds it was written for. It holds
    the kernel, so no other object can take the kernel's id while the table is listed under it."""
    __slots__ = ("kernel", "kinds", "key_of", "table")

    def __init__(self, kernel, kinds: Tuple[bool, ...]):
        self.kernel, self.kinds, self.key_of, self.table = kernel, kinds, _key_function(kinds), {}


def _tensor_key(i: int) -> str:
    """The signature's part for a tensor argument ``a{i}``: its dtype and address modulo 16."""
    return f"a{i}.dtype, a{i}.data_ptr() & 15"


@functools.lru_cache(maxsize=None)
def _key_function(kinds: Tuple[bool, ...]) -> Callable:
    """``key_of(head, options, *args)`` for positional arguments of ``kinds`` (True: a tensor):
    the tuple (head, the constexprs and options (a ``LaunchConfig``, or the items of a keyword
    dictionary), then per tensor its dtype and address modulo 16 and per other argument its
    class and value), written out as one expression."""
    names = [f"a{i}" for i in range(len(kinds))]
    parts = [_tensor_key(i) if is_tensor else f"a{i}.__class__, a{i}" for i, is_tensor in enumerate(kinds)]
    source = (f"def key_of(head, options{''.join(', ' + n for n in names)}):\n"
              f"    return (head, options{''.join(', ' + p for p in parts)})\n")
    scope: dict = {}
    exec(source, scope)  # noqa: S102 - source built above from argument positions only
    return scope["key_of"]


def _remember(kernel, entry: Optional[_Launches], head: tuple, compiled, args: tuple, meta: dict, options) -> None:
    """Keep ``compiled`` under this call's signature with the arguments after the positional ones
    (constexprs and defaults), where the positional ones are exactly the kernel's leading
    runtime parameters and every later one is given or has a default."""
    params = kernel.params
    if compiled is None or len(args) > len(params) or any(p.is_constexpr for p in params[:len(args)]):
        return
    rest = params[len(args):]
    if not all(p.name in meta or p.has_default for p in rest):
        return
    kinds = tuple([isinstance(a, _Tensor) for a in args])
    if entry is None or entry.kinds != kinds:
        entry = _KERNELS[id(kernel)] = _Launches(kernel, kinds)
    try:
        key = entry.key_of(head, options, *args)
        hash(key)
    except TypeError:  # an unhashable argument: Triton's own path every time
        return
    if len(entry.table) >= _MAX_LAUNCHES:
        entry.table.clear()
    entry.table[key] = compiled, tuple(meta[p.name] if p.name in meta else p.default for p in rest)


def run_options(meta: dict, debug: bool) -> dict:
    """The keywords ``JITFunction.run`` hands its argument binder: ``meta`` (constexprs and launch
    options), ``debug`` and the option knobs of this Triton version."""
    options = dict(meta, debug=debug, instrumentation_mode=knobs.compilation.instrumentation_mode)
    if _HAS_FPSAN:
        options["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return options


def _verify_reuse(kernel, grid, args, meta, device, compiled, tail) -> None:
    """``TEC_FAST_LAUNCH=verify``: the kernel and the arguments a reuse hands to the launcher are
    the ones ``JITFunction.run`` would pick and pass (compiled without launching)."""
    chosen = kernel.run(*args, grid=grid, warmup=True, **meta)
    if chosen is not compiled:
        raise AssertionError(f"launch reuse of {kernel.fn.__name__}: Triton picks another compiled kernel")
    binder = kernel.device_caches[device][4]
    options = run_options(meta, meta.get("debug", kernel.debug) or knobs.runtime.debug)
    bound = tuple(binder(*args, **options)[0].values())
    ours = (*args, *tail)
    if len(bound) != len(ours) or any(a is not b and not (type(a) is type(b) and a == b) for a, b in zip(bound, ours)):
        raise AssertionError(f"launch reuse of {kernel.fn.__name__}: arguments differ from Triton's")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def direct_launch() -> bool:
    """Whether an op may call its launchers straight from an ``autograd.Function`` rather than
    through its ``torch.library`` custom ops: only in plain eager execution, where nothing
    intercepts the dispatcher. Under ``torch.compile`` / export, or inside a dispatch mode
    (FakeTensorMode, the traffic counter of ``benchmarks/traffic.py``), the custom ops are what
    the tracer must see. Both routes run the same launchers; a custom op with
    ``register_autograd`` cost the host about 100 us more per forward + backward than the direct
    route (``benchmarks/host_overhead.py`` on the development CPU)."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in effect for ``device_type``; None where autocast is off (or the device
    type has none: the meta tensors ``benchmarks/compile_report.py`` compiles the launchers on)."""
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type`` (nothing to do where it is off already)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def first_order(op: str) -> Callable:
    """Decorator for an op's ``autograd.Function.backward``: its kernels are invisible to
    autograd, so the gradients it returns cannot be differentiated again. In a backward with
    ``create_graph=True`` (the only one that runs with grad mode on) it runs under no_grad, and
    where its incoming gradients or saved tensors require grad its gradients come out of a node
    that raises, naming the op, when a second derivative reaches it. That node's inputs are
    those tensors, so ``torch.autograd.grad(..., inputs=...)`` runs it on the way to any leaf
    they depend on (torch's ``once_differentiable`` hangs its error node on fresh leaves that a
    grad with ``inputs`` never visits, and looks at the incoming gradients only). Gradients
    nobody differentiates again are unaffected; the usual backward pays one grad-mode test."""
    message = (f"tec_fast.ops.{op}: the Triton path's backward cannot be differentiated again (a "
               f"second derivative, create_graph=True, reached it); run {op} on the plain-torch "
               f"reference path for that: TEC_FAST_KERNELS=reference or "
               f"tec_fast.ops.dispatch.set_kernel_mode('reference')").encode()

    def wrap(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            with torch.no_grad():
                out = backward(ctx, *grads)
            anchors = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not anchors:  # nothing a second derivative could flow to
                return out
            out = out if isinstance(out, tuple) else (out,)
            fail = torch._C._functions.DelayedError(message, len(out) + len(anchors))
            return fail(*out, *anchors)[:len(out)]
        return checked
    return wrap


def eager_apply(fn: type) -> Callable:
    """``fn.apply`` for an ``autograd.Function`` subclass, minus torch's Python wrapper around it
    in plain eager mode (it binds default arguments and unwraps functorch wrappers: a few us per
    call). Under ``torch.compile``, a dispatch mode or a functorch transform the normal
    ``fn.apply`` runs, so tracers and transforms see the Function as usual."""
    c_apply = super(torch.autograd.Function, fn).apply
    py_apply = fn.apply
    functorch_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        if direct_launch() and not functorch_active():
            return c_apply(*args)
        return py_apply(*args)
    return apply


# ---- index values: checked by the kernels that read them ------------------------------------
#
# The kernels that read indices (masked_gather's ids_keep, scatter_masked's ids_restore,
# relation_loss's topk_idx) read and write nothing for an index outside its range and set an
# int32 flag to 0 when they meet one; after the launch ``check_index_flag`` turns that into the
# op's error. On CUDA that is one device-side assertion on the flag (no host sync, capturable in
# a CUDA graph) in place of the four elementwise / reduction kernels and the assertion a check of
# the values before the launch costs; on CPU (the interpreter) and under ``TEC_FAST_CHECKS=1``
# the flag is read on the host and an out-of-range index is a ``ValueError`` naming the argument.

_CHECK_SETTINGS = {}  # TEC_FAST_CHECKS, read once (``tec_fast.ops.dispatch.reload_environment`` re-reads it)
_INDEX_OK = {}        # CUDA device index -> the flag kept for the process


def checks_forced() -> bool:
    """``TEC_FAST_CHECKS=1``: index values are checked exactly on CUDA too (one host sync)."""
    forced = _CHECK_SETTINGS.get("checks")
    if forced is None:
        forced = _CHECK_SETTINGS["checks"] = os.environ.get("TEC_FAST_CHECKS", "0") not in ("", "0")
    return forced


def _asserts_on_device(device: torch.device) -> bool:
    """Whether an index check ends in a device-side assertion (CUDA without ``TEC_FAST_CHECKS``)
    rather than a read on the host."""
    return device.type == "cuda" and not checks_forced()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_index_without_kernel(idx: torch.Tensor, name: str, bound: int) -> None:
    """The same check where no kernel runs (an op with an empty output but indices to read)."""
    flag = index_flag(idx.device)
    if idx.numel():
        flag.mul_(((idx >= 0) & (idx < bound)).all())
    check_index_flag(flag, idx, name, bound)


def index_flag(device: torch.device) -> torch.Tensor:
    """The int32 [1] tensor, 1, that a kernel reading indices sets to 0 on an index out of range.
    CUDA without ``TEC_FAST_CHECKS``: one per device for the process (a failed assertion ends the
    CUDA context, so nothing sets it back; made fresh per call only while a CUDA graph is being
    captured before one exists). Else a fresh one per call, read by ``check_index_flag``."""
    if _asserts_on_device(device):
        flag = _INDEX_OK.get(device.index)
        if flag is not None:
            return flag
        if not _capturing(device):
            flag = _INDEX_OK[device.index] = torch.ones(1, dtype=torch.int32, device=device)
            return flag
    return torch.ones(1, dtype=torch.int32, device=device)


def check_index_flag(flag: torch.Tensor, idx: torch.Tensor, name: str, bound: int) -> None:
    """After the launch that was given ``flag``: the op's error for an index of ``idx`` outside
    [0, ``bound``). CUDA: a device-side assertion on the flag; CPU and ``TEC_FAST_CHECKS=1``: the
    flag read on the host, and a ``ValueError`` with the range of values found. Nothing on meta
    tensors (``benchmarks/compile_report.py`` compiles through the launchers without running)."""
    if flag.device.type == "meta":
        return
    if _asserts_on_device(flag.device):
        torch._assert_async(flag, f"{name} holds indices outside [0, {bound})")
    elif not flag.item():
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # the error's message only
        raise ValueError(f"{name} holds indices in [{lo}, {hi}], outside [0, {bound})")


def persistent_programs(work: int, device: torch.device, per_sm: int = 8) -> int:
    """How many programs a kernel that walks its work items in a loop (and keeps one partial sum
    per program) launches: ``per_sm`` per multiprocessor on a GPU (8 four-warp programs are 32
    warps, half an SM's slots, at <= 64 registers per thread: enough resident warps to cover the
    load latency while one program reduces its row), 4 elsewhere; never more than ``work``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(work, per_sm * _sm_count(index)))
    return max(1, min(work, 4))


def row_slices(rows: int, tile_rows: int, columns: int, programs: int) -> Tuple[int, int]:
    """Split ``rows`` into slices of whole ``tile_rows``-row tiles for a (slice, column) grid of
    about ``programs`` persistent programs over ``columns`` column blocks: (slices, rows per
    slice). Each program walks its slice tile by tile and keeps one partial sum."""
    tiles = cdiv(max(rows, 1), tile_rows)
    n_slices = max(1, min(tiles, cdiv(programs, max(columns, 1))))  # no columns (an empty L or C): one slice
    rows_per_slice = cdiv(tiles, n_slices) * tile_rows
    return cdiv(max(rows, 1), rows_per_slice), rows_per_slice


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (the kernels take the other strides as
    arguments), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def relation_block_sizes(topk: int, D: int, dtype: torch.dtype = torch.bfloat16) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_L, BLOCK_D) of the relation kernels: the 1+k query rows and the head dim
    padded to powers of two, at least 16 (``tl.dot`` needs >= 16 on every side); key blocks of
    64, or 32 when the query tile is large or a 4-byte key tile of 128 columns would be (on sm_80
    a [64, 128] fp32 key tile spilled: benchmarks/compile_report.py, ViT-H fp32)."""
    block_r = max(16, next_pow2(topk + 1))
    block_d = max(16, next_pow2(D))
    wide_fp32 = dtype.itemsize >= 4 and block_d >= 128
    block_l = 64 if block_r * block_d <= 64 * 64 and not wide_fp32 else 32
    return block_r, block_l, block_d


# ---- what every kernel supports (each kernel file adds its own limits to these)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_reasons(dtype: torch.dtype) -> List[str]:
    if dtype not in SUPPORTED_DTYPES:
        return [f"dtype {dtype} (the Triton kernels take float32, float16, bfloat16)"]
    return []


MAX_HEAD_DIM = 256        # the relation kernels hold a [1+k, d] query tile in registers
MAX_RELATION_ROWS = 128   # 1 + topk


def relation_reasons(dtype: torch.dtype, shape: Tuple[int, ...], topk=None) -> List[str]:
    """The limits both relation kernels share, for q [B, H, N, d] and ``topk``."""
    reasons = dtype_reasons(dtype)
    if len(shape) == 4 and shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {shape[-1]} > {MAX_HEAD_DIM}")
    if topk is not None and 1 + topk > MAX_RELATION_ROWS:
        reasons.append(f"1 + topk = {1 + topk} rows > {MAX_RELATION_ROWS}")
    return reasons
