"""Triton launches recorded and skipped: the one place the benchmarks replace ``kernel[grid](...)``.

Within ``launches_stubbed(on_launch)`` a Triton kernel launch (``JITFunction.run``, and
``InterpretedFunction.run`` under ``TRITON_INTERPRET=1``) runs nothing and calls
``on_launch(kernel_name, args, kwargs)`` instead. Everything around the launch (the op's Python,
its checks, allocations, autograd) still runs. ``benchmarks/traffic.py`` counts the bytes of the
skipped launches; ``benchmarks/host_overhead.py`` times the host work around them.

Within ``driver_calls_stubbed(on_launch)`` (``TRITON_INTERPRET`` off) Triton's own launch path
runs too: ``JITFunction.run`` binds and specialises the arguments, looks the kernel up in its
cache (compiling it once, for an sm_90 target through the offline driver of
``benchmarks/compile_report.py``) and calls the compiled kernel's launcher; only that last call,
the driver's ``cuLaunchKernel`` behind it, is replaced by ``on_launch(kernel_name, args, {})``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def launches_stubbed(on_launch: Callable[[str, tuple, dict], None]) -> Iterator[None]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid=None, warmup=False, **kwargs):
        fn = getattr(self, "fn", None)
        on_launch(getattr(fn, "__name__", type(self).__name__), args, kwargs)

    originals = [(cls, cls.__dict__.get("run")) for cls in (JITFunction, InterpretedFunction)]
    for cls, _ in originals:
        cls.run = run
    try:
        yield
    finally:
        for cls, original in originals:
            if original is None:
                del cls.run
            else:
                cls.run = original


@contextlib.contextmanager
def driver_calls_stubbed(on_launch: Callable[[str, tuple, dict], None], arch: int = 90) -> Iterator[None]:
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver

    from benchmarks.compile_report import _offline_driver
    from tec_fast.kernels import _common

    stubbed = []  # compiled kernels given this block's launcher, unloaded again on the way out

    def init_handles(self):  # what the launch needs of a loaded module, minus loading it
        if self.module is not None:
            return
        name = self.name
        self._run = lambda *args: on_launch(name, args, {})
        self.module, self.function = "not loaded", 0
        stubbed.append(self)

    original = CompiledKernel.__dict__["_init_handles"]
    driver.set_active(_offline_driver(arch))
    CompiledKernel._init_handles = init_handles
    try:
        yield
    finally:
        for kernel in stubbed:
            kernel.module = kernel.function = kernel._run = None
        _common.forget_launches()  # launch reuse must not hand a later launch a stubbed kernel
        CompiledKernel._init_handles = original
        driver.reset_active() if driver._default is not None else setattr(driver, "_active", None)
