"""Offline compile report: every Triton kernel, compiled for sm_90 / sm_80 through its real host
launcher at ViT-S/B/L/H training shapes, with registers, spills, stack and shared memory.

No GPU is needed. Triton's active driver is replaced by one whose target is the chosen GPU
architecture, and a kernel launch (``JITFunction.run``) is turned into a compile (the
``warmup=True`` path: bind the arguments, specialise, compile, cache; no launch). The launchers
run on meta tensors laid out as the model lays them out (strides included), so each kernel is
specialised exactly as it would be on the device. Triton's own pipeline produces the PTX and a
cubin; the resource usage comes from the bundled ``ptxas -v`` (the one Triton itself runs for
that architecture: ``ptxas-blackwell`` for sm_90) with Triton's flags. Shared memory is Triton's
dynamic allocation (``metadata["shared"]``) plus any static shared memory ptxas reports.

    python -m benchmarks.compile_report                          # ViT-S/B/L/H, bf16+fp32, sm_90+sm_80
    python -m benchmarks.compile_report --sizes vitb,vitl --arch 90 --dtype bf16
    python -m benchmarks.compile_report --check                  # exit 1 on any spill / smem over limit

Appends one JSON row per (arch, size, dtype, kernel) to ``benchmarks/results/compile.jsonl.gz``
(gzip members appended per run; ``gzip.open`` reads them as one file).
"""
from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

# Compiled (not interpreted) kernels: must hold before any @triton.jit function is defined. Only
# when run as a script: a process that imports this module (the tests) keeps its own setting.
if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)

import torch  # noqa: E402

from benchmarks.common import (REPO, format_table, git_commit, make_parser, optional_results_file,  # noqa: E402
                               progress, versions)
from tec_fast.ops.registry import OPS, outputs, unit_grads  # noqa: E402
from tec_fast.ops.registry import SIZES as REGISTRY_SIZES  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "compile.jsonl.gz")
# every registered op's kernel module (tec_fast/ops/registry.py): a registered kernel that does not
# import or define its kernels fails the gate
KERNEL_MODULES = tuple(dict.fromkeys(spec.kernel for spec in OPS.values()))

# Per-block shared memory a kernel may use (opt-in maximum), bytes: H100/H200 227 KB, A100 163 KB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

# TEC training shapes at 224 px, mask ratio 0.75 (K visible patches, T = 1 + K encoder tokens),
# decoder 512 wide with hidden 4 x 512 in the adapter MLPs, the base of the same size as the new
# model (pred_dim = C, pred_heads = H), top-k 15. B: a per-GPU batch that fits an 80-141 GB GPU.
# the registry's model sizes (tec_fast/ops/registry.py), with the token counts the launchers see
SIZES: Dict[str, Dict[str, int]] = {name: dict(s, T=1 + s["K"], N=1 + s["L"])
                                   for name, s in REGISTRY_SIZES.items() if name != "tiny"}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---- compiling instead of launching ---------------------------------------------------------

def _offline_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class OfflineDriver(DriverBase):
        """Triton's view of a device that is not there: a target to compile for, device 0, the
        null stream. Nothing can be launched through it."""

        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("offline compile: nothing runs")

    return OfflineDriver()


@dataclass
class Compiled:
    """One kernel specialisation a launcher asked for."""
    name: str
    kernel: object  # triton.compiler.CompiledKernel
    constexprs: Dict[str, object]
    grid: Tuple[int, ...]


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[List[Compiled]]:
    """Within the block every ``kernel[grid](...)`` compiles for sm_<arch> and launches nothing;
    yields the list the compiled kernels are appended to."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled: List[Compiled] = []
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if getattr(self, "_offline_arch", None) != arch:  # caches hold one target per device
            self.device_caches = defaultdict(self.create_binder)
            self._offline_arch = arch
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        consts = {p.name: kwargs[p.name] for p in self.params if p.is_constexpr and p.name in kwargs}
        compiled.append(Compiled(self.fn.__name__, kernel, consts, tuple(int(g) for g in grid)))
        return kernel

    driver.set_active(_offline_driver(arch))
    JITFunction.run = run
    try:
        yield compiled
    finally:
        JITFunction.run = original_run
        driver.reset_active() if driver._default is not None else setattr(driver, "_active", None)


# ---- resource usage from ptxas -v -----------------------------------------------------------

@dataclass
class Usage:
    registers: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stack_bytes: int = 0
    static_smem_bytes: int = 0
    log: str = field(default="", repr=False)


def ptxas_path(arch: int) -> str:
    """The ptxas Triton runs for sm_<arch> (the bundled ``ptxas-blackwell`` for sm_90 and up)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def ptxas_usage(ptx: str, arch: int) -> Usage:
    """Assemble ``ptx`` with Triton's flags and ``-v``; parse registers, spills, stack, smem."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.cubin")]
        run = subprocess.run(cmd, capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode:
        raise RuntimeError(f"ptxas failed ({run.returncode}):\n{log}")
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> Usage:
    """Numbers from ``ptxas -v`` output (one entry function)."""
    def num(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return Usage(registers=num(r"Used (\d+) registers"),
                 spill_store_bytes=num(r"(\d+) bytes spill stores"),
                 spill_load_bytes=num(r"(\d+) bytes spill loads"),
                 stack_bytes=num(r"(\d+) bytes stack frame"),
                 static_smem_bytes=num(r"(\d+) bytes smem"),
                 log=log)


def disassemble(cubin: bytes, arch: int) -> Optional[str]:
    """The kernel's machine code as text (``nvdisasm -c``, next to Triton's ptxas); None without it."""
    nvdisasm = os.path.join(os.path.dirname(ptxas_path(arch)), "nvdisasm")
    if not os.access(nvdisasm, os.X_OK):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        run = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True)
    return None if run.returncode else run.stdout


def sass_instructions(cubin: bytes, arch: int) -> Optional[int]:
    """Machine instructions in the kernel's code, counted statically (a loop body once); None
    without ``nvdisasm``. For a loop-free elementwise kernel, divided by the elements a thread
    handles, it says whether the kernel can keep up with memory: an SM issues at most 128
    thread-instructions per clock."""
    sass = disassemble(cubin, arch)
    if sass is None:
        return None
    return sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line))


# ---- the launchers at model shapes ----------------------------------------------------------

def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _ids(B: int, n: int) -> torch.Tensor:
    return _meta(B, n, dtype=torch.int64)


def _case_masked_gather(s, dt):
    from tec_fast.kernels import masked_gather as m
    B, L, K, C = s["B"], s["L"], s["K"], s["C"]
    x = _meta(B, C, L, dtype=dt).transpose(1, 2)  # patch_embed: conv [B, C, h, w] -> flatten -> transpose
    pos = _meta(1 + L, C, dtype=dt)[1:]
    m._masked_gather_fwd(x, _ids(B, K), pos)
    m._masked_gather_bwd(_meta(B, K, C, dtype=dt), _ids(B, K), L, dt, torch.float32)


def _case_scatter_masked(s, dt):
    from tec_fast.kernels import scatter_masked as m
    B, L, K, Cd = s["B"], s["L"], s["K"], s["Cd"]
    y = _meta(B, 1 + K, Cd, dtype=dt)  # decoder_embed output; the op reads y[:, 1:]
    pos = _meta(1 + L, Cd, dtype=dt)[1:]
    m._scatter_masked_fwd(y[:, 1:], _ids(B, L), _meta(Cd, dtype=dt), pos)
    m._scatter_masked_bwd(_meta(B, L, Cd, dtype=dt), _ids(B, L), K, dt, (Cd,), torch.float32, torch.float32)


def _case_patch_norm_mse(s, dt):
    from tec_fast.kernels import patch_norm_mse as m
    B, L, C = s["B"], s["L"], s["C"]
    pred = _meta(B, 1 + L, C, dtype=dt)[:, 1:]  # decoder_pred output without its CLS row
    target = _meta(B, L, C)  # base features: fp32
    mask = _meta(B, L)
    _, mean, rstd = m._patch_norm_mse_fwd(pred, target, mask, 1e-6)
    m._patch_norm_mse_bwd(_meta(), pred, target, mask, mean, rstd)


def _qk(B: int, N: int, H: int, d: int, n_proj: int, dt) -> Tuple[torch.Tensor, torch.Tensor]:
    # Linear output [B, N, n_proj * H * d] -> reshape -> permute(2, 0, 3, 1, 4), as the model does
    qkv = _meta(B, N, n_proj, H, d, dtype=dt).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


def _case_relation_targets(s, dt):
    from tec_fast.kernels import relation_targets as m
    B, N, H, C = s["B"], s["N"], s["H"], s["C"]
    q, k = _qk(B, N, H, C // H, 3, dt)  # the base's last block qkv
    m._relation_targets_fwd(q, k, s["topk"], (C // H) ** -0.5)


def _case_relation_loss(s, dt):
    from tec_fast.kernels import relation_loss as m
    B, N, H, C, topk = s["B"], s["N"], s["H"], s["C"], s["topk"]
    q, k = _qk(B, N, H, C // H, 2, dt)  # the relation head's decoder_qk
    idx, target = _ids(B, topk), _meta(B, 1 + topk, H, N - 1)
    _, lse_r, lse_t = m._relation_loss_fwd(q, k, idx, target, 1.8, C ** -0.5)
    m._relation_loss_bwd(_meta(B, H, 1 + topk), q, k, idx, target, lse_r, lse_t, 1.8, C ** -0.5)


def _case_encoder_adapter(s, dt):
    from tec_fast.kernels import encoder_adapter as m
    B, T, C, D, G, Hd = s["B"], s["T"], s["C"], s["D"], s["G"], s["hidden"]
    M = D // G
    feats = _meta(D, B, T, C, dtype=dt)
    w = dict(ln_before_w=_meta(D * C), ln_before_b=_meta(D * C), fuse_w=_meta(G, C, M * C),
             fc1_w=_meta(G, Hd, C), fc2_w=_meta(G, C, Hd), ln_after_w=_meta(C))
    out, mean_in, rstd_in, u, h_pre, ssum, mean_out, rstd_out = m._adapter_fwd(
        feats, w["ln_before_w"], w["ln_before_b"], w["fuse_w"], _meta(G, C), w["fc1_w"], _meta(G, Hd),
        w["fc2_w"], _meta(G, C), w["ln_after_w"], _meta(C), 1e-5, 1e-5, dt, torch.float32)
    m._adapter_bwd(_meta(B, T, C), feats, w["ln_before_w"], w["ln_before_b"], w["fuse_w"], w["fc1_w"],
                   w["fc2_w"], w["ln_after_w"], mean_in, rstd_in, u, h_pre, ssum, mean_out, rstd_out)


def _case_layer_norm(s, dt):
    from tec_fast.kernels import layer_norm as m
    for rows, C in ((s["B"] * s["T"], s["C"]), (2 * s["B"] * s["N"], s["Cd"])):  # encoder, decoder
        x, res = _meta(rows, C, dtype=dt), _meta(rows, C, dtype=dt)
        w, b = _meta(C), _meta(C)
        y, h, stats = m._layer_norm_fwd(x, res, w, b, 1e-6)
        m._layer_norm_bwd(_meta(rows, C, dtype=dt), _meta(rows, C, dtype=dt), h, w, stats, torch.float32)


def _case_mlp(s, dt):
    from tec_fast.kernels import mlp as m
    # encoder blocks (C -> 4C over the visible tokens), decoder blocks (both streams, all tokens)
    for rows, hidden in ((s["B"] * s["T"], 4 * s["C"]), (2 * s["B"] * s["N"], 4 * s["Cd"])):
        pre = _meta(rows, hidden, dtype=dt)
        m._mlp_gelu_fwd(pre)
        m._mlp_gelu_bwd(pre, _meta(rows, hidden, dtype=dt))


def _case_qkv_heads(s, dt):
    from tec_fast.kernels import qkv_heads as m
    # encoder blocks (B x T tokens, H heads of C / H); decoder blocks (both streams, all tokens,
    # 16 heads of Cd / 16), with dq as SDPA returns it ([B, H, N, d]) and as a transposed view
    for B, N, H, d in ((s["B"], s["T"], s["H"], s["C"] // s["H"]), (2 * s["B"], s["N"], 16, s["Cd"] // 16)):
        g = _meta(B, H, N, d, dtype=dt)
        m._qkv_pack(g, g, g)
        gt = _meta(B, N, H, d, dtype=dt).transpose(1, 2)
        m._qkv_pack(gt, gt, gt)


def _case_patch_embed(s, dt):
    from tec_fast.kernels import patch_embed as m
    side = 16 * int(round(s["L"] ** 0.5))  # 16-pixel patches (ViT-H/14's are 14: same kernel, P=14)
    m._patchify(torch.empty(s["B"], 3, side, side, device="meta"), 16, dt)  # fp32 images -> dt patches


# The layouts the model hands some launchers beyond the registry example (strided views, the
# decoder's sizes, transposed gradients): compiled too, as each specialises the kernels
# differently. Optional: an op without an entry is compiled through its registry example alone.
LAYOUT_CASES: Dict[str, Callable[[Dict[str, int], torch.dtype], None]] = {
    "patch_embed": _case_patch_embed,
    "masked_gather": _case_masked_gather,
    "scatter_masked": _case_scatter_masked,
    "patch_norm_mse": _case_patch_norm_mse,
    "relation_targets": _case_relation_targets,
    "relation_loss": _case_relation_loss,
    "encoder_adapter": _case_encoder_adapter,
    "layer_norm": _case_layer_norm,
    "mlp": _case_mlp,
    "qkv_heads": _case_qkv_heads,
}


def registry_case(op: str, s: Dict[str, int], dt: torch.dtype) -> None:
    """The op's registry example on meta tensors at these sizes, forward and backward through its
    Triton path (every launcher it reaches compiles)."""
    from tec_fast.ops.dispatch import fast_impl
    ex = OPS[op].example(s, dt, torch.device("meta"))
    outs = outputs(fast_impl(op)(*ex.args, **ex.kwargs))
    if ex.grad_of and outs:
        torch.autograd.grad(outs, ex.grad_of, unit_grads(outs), allow_unused=True)


def _compile_case(op: str) -> Callable[[Dict[str, int], torch.dtype], None]:
    def case(s, dt):
        registry_case(op, s, dt)
        if op in LAYOUT_CASES:
            LAYOUT_CASES[op](s, dt)
    return case


CASES: Dict[str, Callable[[Dict[str, int], torch.dtype], None]] = {op: _compile_case(op) for op in OPS}


def kernel_module_errors() -> Dict[str, str]:
    """Registered kernel modules that do not import or define no ``@triton.jit`` kernel: op -> why."""
    import importlib
    from triton.runtime.jit import JITFunction
    errors = {}
    for spec in OPS.values():
        try:
            mod = importlib.import_module(f"tec_fast.kernels.{spec.kernel}")
        except Exception as e:
            errors[spec.name] = f"kernels/{spec.kernel}.py does not import ({type(e).__name__}: {e})"
            continue
        if any(isinstance(obj, JITFunction) and obj.__module__ == mod.__name__ for obj in vars(mod).values()):
            continue
        reused = getattr(mod, "KERNELS_FROM", ())
        unknown = [m for m in reused if m not in KERNEL_MODULES]
        if not reused or unknown:
            errors[spec.name] = (f"kernels/{spec.kernel}.py defines no @triton.jit kernel"
                                 + (f" and names unregistered kernel modules {unknown}" if unknown else ""))
    return errors


def reusing_ops() -> List[str]:
    """Ops whose kernel module launches only other ops' kernels (its ``KERNELS_FROM``): those
    kernels compile in their own ops' cases, so the gate compiles nothing for these."""
    import importlib
    found = []
    for spec in OPS.values():
        try:
            if getattr(importlib.import_module(f"tec_fast.kernels.{spec.kernel}"), "KERNELS_FROM", ()):
                found.append(spec.name)
        except Exception:
            continue
    return found


def all_kernels() -> Dict[str, str]:
    """Every ``@triton.jit`` kernel (name ending in ``_kernel``) in the registered kernel modules:
    name -> op module (modules that do not import are reported by ``kernel_module_errors``)."""
    import importlib
    from triton.runtime.jit import JITFunction
    found = {}
    for op in KERNEL_MODULES:
        try:
            mod = importlib.import_module(f"tec_fast.kernels.{op}")
        except Exception:
            continue
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == mod.__name__:
                found[name] = op
    return found


# ---- the report -----------------------------------------------------------------------------

def case_ops(ops: Optional[List[str]] = None) -> List[str]:
    """The ops ``compile_rows`` visits, in order: ``ops`` (default: every case) but those whose
    kernels compile in other ops' cases (``reusing_ops``), unless their kernel module is broken."""
    module_errors, reusing = kernel_module_errors(), reusing_ops()
    return [op for op in ops or list(CASES) if op not in reusing or op in module_errors]


def compile_rows(arch: int, size: str, dtype: str, ops: Optional[List[str]] = None,
                 started: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Compile every op's kernels at one (arch, size, dtype); one row per distinct specialisation
    (a kernel launched twice with the same specialisation is compiled and counted once).
    ``started`` is told each op before its kernels compile."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    rows, common = [], dict(target=f"cuda:{sm_arch_from_capability(arch)}", arch=arch, shape=size, dtype=dtype)
    module_errors = kernel_module_errors()
    for op in case_ops(ops):
        if started is not None:
            started(op)
        if op in module_errors:  # a registered kernel the gate cannot compile: an error row, never a skip
            rows.append(dict(common, op=op, kernel=None, error=module_errors[op]))
            continue
        with compile_only(arch) as compiled:
            try:
                CASES[op](SIZES[size], DTYPES[dtype])
                error = None
            except Exception as e:  # one op failing to compile must not hide the others
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                error = f"{type(e).__name__}: " + " ... ".join(dict.fromkeys(lines[:1] + lines[-1:]))
        if error:
            rows.append(dict(common, op=op, kernel=None, error=error))
        seen = set()
        for c in compiled:
            if id(c.kernel) in seen:
                continue
            seen.add(id(c.kernel))
            meta = c.kernel.metadata
            use = ptxas_usage(c.kernel.asm["ptx"], arch)
            smem = int(meta.shared or 0) + use.static_smem_bytes
            rows.append(dict(common, op=op, kernel=c.name, registers=use.registers,
                             spill_store_bytes=use.spill_store_bytes, spill_load_bytes=use.spill_load_bytes,
                             stack_bytes=use.stack_bytes, smem_bytes=smem, smem_limit=SMEM_LIMIT.get(arch),
                             num_warps=int(meta.num_warps), num_stages=int(meta.num_stages),
                             sass_instructions=sass_instructions(c.kernel.asm["cubin"], arch),
                             constexprs={k: _json_value(v) for k, v in c.constexprs.items()}, grid=list(c.grid)))
    return rows


def _json_value(v):
    """A constexpr as the JSON row holds it: numbers, strings and flags as they are, anything else
    (a ``tl.dtype``) by its name."""
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def problems(rows: List[Dict]) -> List[str]:
    """What the CI gate rejects: compile errors, spills, a stack frame (local memory), shared
    memory over the target's limit."""
    out = []
    for r in rows:
        where = f"{r['kernel'] or r['op']} [{r['target']} {r['shape']} {r['dtype']}]"
        if r.get("error"):
            out.append(f"{where}: {r['error']}")
            continue
        if r["spill_store_bytes"] or r["spill_load_bytes"]:
            out.append(f"{where}: spills {r['spill_store_bytes']} B stores / {r['spill_load_bytes']} B loads")
        if r["smem_limit"] and r["smem_bytes"] > r["smem_limit"]:
            out.append(f"{where}: {r['smem_bytes']} B shared memory > limit {r['smem_limit']} B")
    return out


def table(rows: List[Dict]) -> str:
    columns = ["target", "shape", "dtype", "kernel", "regs", "spill st/ld B", "stack B", "smem B", "warps",
               "SASS instr", "constexprs"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append({"target": r["target"], "shape": r["shape"], "dtype": r["dtype"], "kernel": r["op"],
                         "regs": "ERROR", "spill st/ld B": r["error"]})
            continue
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        body.append({"target": r["target"], "shape": r["shape"], "dtype": r["dtype"], "kernel": r["kernel"],
                     "regs": r["registers"], "spill st/ld B": f"{r['spill_store_bytes']}/{r['spill_load_bytes']}",
                     "stack B": r["stack_bytes"], "smem B": r["smem_bytes"], "warps": r["num_warps"],
                     "SASS instr": r.get("sass_instructions"), "constexprs": consts})
    return format_table(body, columns)


COLUMNS = """The table (one line per compiled kernel specialisation; the rows file has the same and more):
  target         the compile target, cuda:sm_90a or cuda:sm_80
  shape, dtype   the model size (below) and the activation dtype
  kernel         the @triton.jit kernel; an op's name, with ERROR, where its case did not compile
  regs           registers per thread (ptxas); 255 is the most a thread can have
  spill st/ld B  bytes spilled to local memory per thread, stores / loads (the gate wants 0 / 0)
  stack B        stack frame per thread, bytes
  smem B         shared memory per program, bytes: Triton's dynamic allocation + ptxas' static
  warps          warps per program (num_warps)
  SASS instr     machine instructions in the cubin (- without nvdisasm)
  constexprs     the compile-time constants of the launch (block sizes, flags)"""


def main(argv: Optional[List[str]] = None) -> int:
    p = make_parser("compile_report", __doc__, epilog=COLUMNS + "\n\nShapes (per-GPU batch B, visible tokens "
                    "T = 1 + L/4):\n" + "\n".join(f"  {k}: " + " ".join(f"{a}={b}" for a, b in v.items())
                                                for k, v in SIZES.items()))
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {','.join(SIZES)}")
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities, e.g. 90,80")
    p.add_argument("--dtype", default="bf16,fp32", help="comma-separated activation dtypes: bf16,fp32")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--out", default=RESULTS, type=optional_results_file,
                   help="JSON-lines file the rows are appended to, gzip-compressed when it ends in .gz "
                        "(default benchmarks/results/compile.jsonl.gz; '' = none)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on a compile error, a spill or shared memory over the target's limit")
    p.add_argument("--require-all", action="store_true",
                   help="with --check: also fail when a @triton.jit kernel in kernels/ was not compiled")
    args = p.parse_args(argv)
    split = lambda v: [x for x in v.split(",") if x]  # noqa: E731
    try:
        archs = [int(a) for a in split(args.arch)]
    except ValueError:
        p.refuse("--arch", f"expected compute capabilities like 90,80, got {args.arch!r}")
    sizes, dtypes = split(args.sizes), split(args.dtype)
    ops = split(args.ops) if args.ops is not None else None
    for name, got, text in (("--sizes", sizes, args.sizes), ("--arch", archs, args.arch),
                            ("--dtype", dtypes, args.dtype), ("--ops", ops, args.ops)):
        if got is not None and not got:  # a gate over nothing would pass
            p.refuse(name, f"names nothing: {text!r}; give at least one, comma-separated")
    for name, got, allowed in (("--sizes", sizes, SIZES), ("--dtype", dtypes, DTYPES), ("--ops", ops or [], CASES)):
        bad = [x for x in got if x not in allowed]
        if bad:
            p.refuse(name, f"unknown {bad}; choose from {list(allowed)}")
    for arch in archs:
        if not os.access(ptxas_path(arch), os.X_OK):
            p.refuse("--arch", f"no executable ptxas for sm_{arch} at {ptxas_path(arch)}")

    import triton
    rows, total = [], len(archs) * len(sizes) * len(dtypes) * len(case_ops(ops))
    count = iter(range(1, total + 1))
    for arch in archs:
        for size in sizes:
            for dtype in dtypes:
                rows += compile_rows(arch, size, dtype, ops, lambda op: progress(
                    next(count), total, f"sm_{arch} {size} {dtype} {op}"))
    print(table(rows))
    stamp = dict(triton=triton.__version__, torch=versions()["torch"], commit=git_commit(),
                 ptxas={a: os.path.basename(ptxas_path(a)) for a in archs},
                 timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with (gzip.open(args.out, "at") if args.out.endswith(".gz") else open(args.out, "a")) as f:
            for r in rows:
                f.write(json.dumps(dict(r, triton=stamp["triton"], torch=stamp["torch"], commit=stamp["commit"],
                                        ptxas=stamp["ptxas"][r["arch"]], timestamp=stamp["timestamp"])) + "\n")
        print(f"appended {len(rows)} rows to {args.out}")
    if args.check:
        bad = problems(rows)
        if args.require_all:
            covered = {r["kernel"] for r in rows if r.get("kernel")}
            wanted = {k for k, op in all_kernels().items() if ops is None or op in ops}
            bad += [f"{k}: not compiled by any case (add it to CASES)" for k in sorted(wanted - covered)]
        for line in bad:
            print("FAIL", line)
        if bad:
            return 1
        print("OK: no spills, shared memory within limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
