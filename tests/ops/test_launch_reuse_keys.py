"""What ``kernels._common._remember`` keeps for a later launch with the same call signature, on
a stand-in kernel (its parameters only: the reuse itself runs with the interpreter off, in
``test_launch_reuse.py``)."""
from types import SimpleNamespace

import pytest
import torch

from tec_fast.kernels import _common


def _param(name, constexpr=False, default=None, has_default=False):
    return SimpleNamespace(name=name, is_constexpr=constexpr, has_default=has_default, default=default)


def _kernel():
    """x_ptr, n (runtime), BLOCK (constexpr), num_warps-like option with a default."""
    return SimpleNamespace(params=[_param("x_ptr"), _param("n"), _param("BLOCK", constexpr=True),
                                   _param("FLAG", constexpr=True, default=False, has_default=True)])


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.setattr(_common, "_KERNELS", {})
    return _common._KERNELS


HEAD = ("driver", 0)


def _remember(kernel, args, meta, compiled="compiled"):
    entry = _common._KERNELS.get(id(kernel))
    options = tuple(meta.items())
    _common._remember(kernel, entry, HEAD, compiled, args, meta, options)
    return options


def test_a_launch_that_compiled_nothing_is_not_kept(tables):
    kernel = _kernel()
    _remember(kernel, (torch.zeros(4), 4), {"BLOCK": 16}, compiled=None)
    assert id(kernel) not in tables


def test_given_constexprs_are_kept_over_their_defaults(tables):
    kernel = _kernel()
    x = torch.zeros(4)
    options = _remember(kernel, (x, 4), {"BLOCK": 16, "FLAG": True})
    entry = tables[id(kernel)]
    compiled, tail = entry.table[entry.key_of(HEAD, options, x, 4)]
    assert compiled == "compiled" and tail == (16, True)
    options = _remember(kernel, (x, 4), {"BLOCK": 32})  # FLAG left to its default
    assert entry.table[entry.key_of(HEAD, options, x, 4)][1] == (32, False)


def test_arguments_of_other_kinds_get_a_new_key_function(tables):
    """A scalar where the first launch passed a tensor and the reverse: remembered under a key
    function written for the new kinds, not the first one's."""
    kernel = _kernel()
    x = torch.zeros(4)
    _remember(kernel, (x, 4), {"BLOCK": 16})
    options = _remember(kernel, (4, x), {"BLOCK": 16})
    entry = tables[id(kernel)]
    assert entry.kinds == (False, True)
    assert entry.key_of(HEAD, options, 4, x) in entry.table


def test_a_table_starts_over_at_its_limit(tables, monkeypatch):
    monkeypatch.setattr(_common, "_MAX_LAUNCHES", 3)
    kernel = _kernel()
    x = torch.zeros(4)
    for n in range(10):
        _remember(kernel, (x, n), {"BLOCK": 16})
        assert len(tables[id(kernel)].table) <= 3
