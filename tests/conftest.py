"""Shared test setup.

Triton kernels run on CPU tensors through the Triton interpreter, which must be switched on
before any ``@triton.jit`` function is defined, so it is set here at import time for the whole
session when there is no GPU (the reference path does not care; an explicit TRITON_INTERPRET
wins). Tests that want the Triton path on CPU tensors use the ``triton_path`` fixture, which
forces ``TEC_FAST_KERNELS=triton`` for that test only. Tests marked ``gpu`` run on CUDA tensors
(compiled Triton) and are skipped without a GPU. Helpers: ``assert_close`` (says where the
worst element is and how many failed) and ``assert_low_precision_ok`` (bf16/fp16 rule).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# CPU-only machine: interpret the Triton kernels. With a GPU, compile them for real (the
# CPU-tensor Triton tests then skip; the ``gpu`` tests run them on the device).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


def _patch_interpreter_bf16_dot() -> None:
    """The interpreter multiplies bf16 ``tl.dot`` operands as raw uint16 bit patterns (upstream
    issue 11584); upcast them to fp32 first, as the tensor cores effectively do on a GPU."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # triton missing: the Triton tests skip themselves
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_tec_bf16_patched", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def upcast(h):
            if h.dtype.scalar == tl.bfloat16:
                data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interpreter.TensorHandle(data, tl.float32)
            return h
        return original(self, upcast(a), upcast(b), d, input_precision, max_num_imprecise_acc)

    create_dot._tec_bf16_patched = True
    builder.create_dot = create_dot


def _patch_interpreter_bf16_rounding() -> None:
    """The interpreter converts fp32 to bf16 by truncating the mantissa; the GPU (and torch)
    round to nearest even. Round like the GPU, so kernels are judged on their own error."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_tec_bf16_patched", False):
        return
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            rounded = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._tec_bf16_patched = True
    builder.cast_impl = cast_impl  # create_fp_trunc & co. look cast_impl up at call time


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _patch_interpreter_bf16_dot()
    _patch_interpreter_bf16_rounding()


@pytest.fixture(autouse=True)
def one_thread():
    """Test shapes are tiny: intra-op threads only contend (up to 70x slower per step on a busy
    2-core machine), so every test runs on one thread and restores the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _interpreter_breaks_on_numpy():
        import triton
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter cannot run these kernels with numpy {np.__version__}: it "
            f"converts a loop bound with int() of a one-element array, which numpy 2.4 refuses ('only "
            f"0-dimensional arrays can be converted to Python scalars'). Install numpy<2.4 (the suite passes "
            f"with Triton 3.6 and numpy 2.3.5) or Triton 3.9.")


def _interpreter_breaks_on_numpy() -> bool:
    """Triton 3.6's interpreter with numpy >= 2.4: every kernel with a loop fails (seen with
    torch 2.11, Triton 3.6.0 and numpy 2.4.6; Triton 3.9 is unaffected)."""
    try:
        import triton
    except Exception:
        return False
    numpy_major_minor = tuple(int(v) for v in np.__version__.split(".")[:2])
    return triton.__version__.startswith("3.6.") and numpy_major_minor >= (2, 4)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


# tec_fast reads TEC_FAST_KERNELS / TRITON_INTERPRET / TEC_FAST_CHECKS / TEC_FAST_LAUNCH once (no environment
# read per op call); a test that changes them through ``monkeypatch`` gets them re-read, and re-read again on undo.
_DISPATCH_ENV = ("TEC_FAST_KERNELS", "TRITON_INTERPRET", "TEC_FAST_CHECKS", "TEC_FAST_LAUNCH")


def _reload_dispatch_env() -> None:
    from tec_fast.ops import dispatch
    dispatch.reload_environment()


@pytest.fixture
def monkeypatch():
    from _pytest.monkeypatch import MonkeyPatch

    class DispatchAwareMonkeyPatch(MonkeyPatch):
        def setenv(self, name, value, prepend=None):
            super().setenv(name, value, prepend)
            if name in _DISPATCH_ENV:
                _reload_dispatch_env()

        def delenv(self, name, raising=True):
            super().delenv(name, raising)
            if name in _DISPATCH_ENV:
                _reload_dispatch_env()

    mp = DispatchAwareMonkeyPatch()
    yield mp
    mp.undo()
    _reload_dispatch_env()


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton path for CPU tensors (through the interpreter)."""
    if not _triton_importable():
        pytest.skip("triton does not import")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("TRITON_INTERPRET is off: Triton cannot run on CPU tensors")
    monkeypatch.setenv("TEC_FAST_KERNELS", "triton")
    yield


@pytest.fixture
def cuda_triton_path(monkeypatch):
    """Force the Triton path for CUDA tensors (compiled kernels); use with ``@pytest.mark.gpu``."""
    if not _triton_importable():
        pytest.skip("triton does not import")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is on: the GPU tests check compiled kernels")
    monkeypatch.setenv("TEC_FAST_KERNELS", "triton")
    yield


@pytest.fixture
def reference_path(monkeypatch):
    monkeypatch.setenv("TEC_FAST_KERNELS", "reference")
    yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                 name: str = "tensor") -> None:
    """torch.testing-style closeness check whose message says where the worst element is and
    how many elements failed: |actual - expected| <= atol + rtol * |expected|."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if not (torch.isfinite(a) == torch.isfinite(e)).all() or \
            not torch.equal(a[~torch.isfinite(a)].nan_to_num(0.0), e[~torch.isfinite(e)].nan_to_num(0.0)):
        bad = (torch.isfinite(a) != torch.isfinite(e)).nonzero()
        raise AssertionError(f"{name}: non-finite values differ, first at {bad[0].tolist() if len(bad) else '?'}")
    finite = torch.isfinite(e)
    err = (a - e).abs().where(finite, torch.zeros_like(a))
    allowed = atol + rtol * e.abs().where(finite, torch.zeros_like(e))
    failed = err > allowed
    if failed.any():
        n = int(failed.sum())
        excess = (err - allowed).where(failed, torch.full_like(err, -1.0))
        worst = int(excess.flatten().argmax())
        where = list(torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else []
        where = [int(i) for i in where]
        raise AssertionError(
            f"{name}: {n} of {a.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); worst at "
            f"{where}: actual {a.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g}, "
            f"|diff| {err.flatten()[worst].item():.3g}; max |diff| {err.max().item():.3g}")


def strided_copy(t: torch.Tensor, how: str = "last") -> torch.Tensor:
    """t's values (and requires_grad) in a non-contiguous view on t's device: ``last``, every
    element two apart; ``rows``, the first dimension's stride doubled."""
    if how == "last":
        base = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)[..., 0]
    else:
        base = torch.zeros(max(2 * t.shape[0], 1), *t.shape[1:], dtype=t.dtype, device=t.device)[::2][:t.shape[0]]
    view = base.detach()
    view.copy_(t.detach())
    assert not view.is_contiguous() or t.numel() <= 1
    return view.requires_grad_(t.requires_grad)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


# Error budget of a bf16 / fp16 computation, as a fraction of the largest exact value: 8 units in
# the last place of that precision (2^-8 and 2^-11). Measured on the CPU suite: at most 5.8 bf16
# ulps (a LayerNorm's output), most results 1-2.
LOW_PRECISION_BUDGET = {torch.bfloat16: 8 * 2.0 ** -8, torch.float16: 8 * 2.0 ** -11}


def assert_low_precision_ok(kernel: torch.Tensor, eager_lowp: torch.Tensor, exact: torch.Tensor,
                            atol: float, name: str = "tensor", dtype: torch.dtype = torch.bfloat16) -> None:
    """A bf16/fp16 result against an fp32 / float64 reference: max |kernel - exact| <=
    LOW_PRECISION_BUDGET[dtype] * max |exact| + atol, a fixed bound. The error of the same
    computation done by eager torch in that precision is reported beside it but bounds nothing on
    the CPU: torch's CPU kernels round differently per instruction set (ATEN_CPU_CAPABILITY). On
    CUDA tensors flash-attention's rule may also pass a result: no worse than twice eager's error."""
    k_err = max_abs_err(kernel, exact)
    e_err = max_abs_err(eager_lowp, exact)
    budget = LOW_PRECISION_BUDGET[dtype] * exact.detach().abs().max().item() + atol
    if kernel.is_cuda:
        budget = max(budget, 2 * e_err + atol)
    if not k_err <= budget:
        raise AssertionError(f"{name}: kernel max error {k_err:.3g} > budget {budget:.3g} ({dtype} "
                             f"x max|exact| + atol {atol:g}); eager torch in {dtype}: {e_err:.3g}")


@pytest.fixture(autouse=True)
def kernel_mode_restored():
    """A test that forces a kernel mode in-process (``dispatch.set_kernel_mode``, or a benchmark's
    ``main`` that does) must not hand it to the tests after it (a forced Triton mode sends meta
    tensors to the interpreter): the mode read from the environment again where it changed."""
    from tec_fast.ops import dispatch
    mode, interpret = dispatch.kernel_mode(), dispatch.interpreter_on()
    yield
    if dispatch._SETTINGS.get("mode", mode) != mode or dispatch._SETTINGS.get("interpret", interpret) != interpret:
        dispatch.reload_environment()


@pytest.fixture(autouse=True)
def interpreter_setting_stays():
    """TRITON_INTERPRET is read when kernels are defined, once per session: a test (or a module it
    imports) that changes it would silently turn the later Triton tests into skips."""
    before = os.environ.get("TRITON_INTERPRET")
    yield
    assert os.environ.get("TRITON_INTERPRET") == before, "this test changed TRITON_INTERPRET"


def ptxas_or_skip(arch: int = 90) -> str:
    """The ptxas Triton runs for sm_<arch> (the bundled ``ptxas-blackwell``); the test is skipped
    where Triton's NVIDIA backend does not import or ships none: offline compiles need it."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
    except Exception as e:  # triton missing or without its NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is not importable: {e}")
    if not (path and os.access(path, os.X_OK)):
        pytest.skip(f"no bundled ptxas for sm_{arch} (ptxas-blackwell) at {path}")
    return path


def env_without_interpreter() -> dict:
    """This process's environment without TRITON_INTERPRET, for a subprocess that compiles the
    kernels for real (this process's kernels were defined under the interpreter)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def write_class_folders(folder, classes, per_class: int, hw, rng) -> None:
    """An image-folder dataset of random RGB PNGs: ``folder/<class>/<i>.png``, ``hw`` = (height,
    width), the pixels drawn from the numpy generator ``rng`` class by class."""
    from PIL import Image
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def assert_routes_agree(module, run, monkeypatch, also=()):
    """``run()`` -> list of tensors, once through the eager route of a kernel ``module``
    (``direct_launch``) and once through its custom ops: both must agree bitwise. ``also``: the
    kernel modules whose launch helpers ``module`` calls (each reads its own ``direct_launch``),
    switched to their custom ops together with it."""
    assert module.direct_launch(), "the test must run in plain eager mode"
    direct = run()
    for m in (module, *also):
        monkeypatch.setattr(m, "direct_launch", lambda: False)
    via_op = run()
    assert len(direct) == len(via_op)
    for i, (a, e) in enumerate(zip(direct, via_op)):
        assert torch.equal(a, e), f"output {i} differs between the eager route and the custom ops"


def refused_in_one_line(main, argv, capsys, flag=None) -> str:
    """``main(argv)`` must refuse: exit status 2, one ``error:`` line on stderr (``error: argument
    FLAG: ...`` where ``flag`` is given), no usage block, nothing on stdout. Returns the line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2, (info.value.code, err)
    lines = err.strip().splitlines()
    prefix = f"error: argument {flag}: " if flag else "error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "usage:" not in err and out == "", (out, err)
    return lines[0]
