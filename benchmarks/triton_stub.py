"""Triton launches recorded and skipped: the one place the benchmarks replace ``kernel[grid](...)``.

Within ``launches_stubbed(on_launch)`` a Triton kernel launch (``JITFunction.run``, and
``InterpretedFunction.run`` under ``TRITON_INTERPRET=1``) runs nothing and calls
``on_launch(kernel_name, args, kwargs)`` instead. Everything around the launch (the op's Python,
its checks, allocations, autograd) still runs. ``benchmarks/traffic.py`` counts the bytes of the
skipped launches; ``benchmarks/host_overhead.py`` times the host work around them.
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
