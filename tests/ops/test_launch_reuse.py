"""``kernels._common.launch`` reuses a compiled kernel by call signature (``TEC_FAST_LAUNCH``).
Whether it picks the kernel and the arguments Triton's ``JITFunction.run`` would is checked
offline: kernels compiled for sm_90 through the compile report's offline driver, the driver
call stubbed, every reuse compared with Triton's own choice (``TEC_FAST_LAUNCH=verify``), in a
subprocess with the interpreter off (``launch_reuse_check.py``)."""
import os
import subprocess
import sys

import pytest

from conftest import env_without_interpreter, ptxas_or_skip

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _check(*extra):
    ptxas_or_skip(90)
    from tec_fast.kernels._common import _REUSE_TRITON
    import triton
    if ".".join(triton.__version__.split(".")[:2]) not in _REUSE_TRITON:
        pytest.skip(f"triton {triton.__version__}: the reuse is off there")
    env = env_without_interpreter()
    env.update(TEC_FAST_LAUNCH="verify", TEC_FAST_KERNELS="triton",
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    return subprocess.run([sys.executable, os.path.join(HERE, "launch_reuse_check.py"), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_every_reuse_is_the_kernel_and_arguments_triton_picks():
    done = _check()
    assert done.returncode == 0, done.stderr[-3000:]
    checked = int(done.stdout.split("checked ")[1].split()[0])
    assert checked > 100  # every op, forward and backward, reused at least once


def test_the_check_catches_a_signature_without_alignment():
    done = _check("--plant-bug")
    assert done.returncode != 0
    assert "Triton picks another compiled kernel" in done.stderr


def test_launch_mode_setting(monkeypatch):
    from tec_fast.kernels import _common
    monkeypatch.setenv("TEC_FAST_LAUNCH", "sometimes")
    with pytest.raises(ValueError, match="TEC_FAST_LAUNCH must be 0, 1 or verify"):
        _common.launch_mode()
    monkeypatch.setenv("TEC_FAST_LAUNCH", "0")
    assert _common.launch_mode() == "0"
    monkeypatch.delenv("TEC_FAST_LAUNCH")
    assert _common.launch_mode() in ("1", "0")  # 0 on a Triton version the reuse was not checked on
    assert isinstance(_common.launch_path(), str)


def test_key_function_separates_what_triton_specialises_on():
    """The signature written per kernel: a tensor's dtype and address modulo 16, every other
    argument's class and value (1, 1.0 and True apart), the constexprs by name (a keyword
    dictionary's items, or a ``LaunchConfig`` by identity); arguments of other kinds than it was
    written for fail (a tensor's slot) or cannot match (a scalar's)."""
    import torch
    from tec_fast.kernels._common import LaunchConfig, _key_function
    key_of = _key_function((True, False))
    head = ("driver", 0)
    buf = torch.zeros(8)
    x, x_odd, x_bf16 = buf[:4], buf[1:5], torch.zeros(4, dtype=torch.bfloat16)

    def items(**meta):
        return tuple(meta.items())
    meta = items(BLOCK=16, num_warps=4)
    base = key_of(head, meta, x, 1)
    assert base == key_of(head, items(BLOCK=16, num_warps=4), torch.zeros(4), 1)  # same dtype and alignment
    config = LaunchConfig(BLOCK=16, num_warps=4)
    others = [key_of(head, meta, x_odd, 1), key_of(head, meta, x_bf16, 1), key_of(head, meta, x, 1.0),
              key_of(head, meta, x, True), key_of(head, meta, x, 2), key_of(head, items(BLOCK=32, num_warps=4), x, 1),
              key_of(head, items(num_warps=16, BLOCK=4), x, 1), key_of(("driver", 1), meta, x, 1),
              key_of(head, config, x, 1), key_of(head, LaunchConfig(BLOCK=16, num_warps=4), x, 1)]
    assert all(k != base for k in others)
    assert len(set(others)) == len(others)  # a config stands for itself only: another with its contents misses
    assert key_of(head, config, x, 1) == key_of(head, config, torch.zeros(4), 1)
    with pytest.raises(AttributeError):
        key_of(head, meta, 3, 1)  # a scalar where the tensor was
    assert key_of(head, meta, x, x) != key_of(head, meta, x, 1)  # a tensor where the scalar was: no match
    with pytest.raises(TypeError):
        key_of(head, meta, x)  # another count
