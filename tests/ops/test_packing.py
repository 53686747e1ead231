"""tec_fast.packing: pack / unpack / plan_bins / position_ids against plain-torch references,
gradients, bad inputs, the fallback path without the compiled extension, and a benchmark smoke run.

The kernels under test are whatever this install runs (the C++ extension when it built, see
``test_extension_loaded_when_built``); the fallback runs in subprocesses with TEC_FAST_NO_EXT=1
or without a build record, since the operators can be registered only once per process.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tec_fast import packing

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 1, 1), (1, 7, 5), (3, 13, 17), (5, 49, 33), (2, 64, 768)]


# ---- references written from the contract: boolean indexing + cumsum -------------------------
def ref_pack(x, keep):
    lengths = keep.sum(1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    max_len = int(lengths.max()) if keep.shape[0] else 0
    B, L = keep.shape
    flat = torch.arange(B * L).reshape(B, L)
    return x[keep], cu, max_len, flat[keep]


def ref_unpack(packed, keep, fill):
    out = fill.expand(*keep.shape, fill.shape[0]).clone()
    out[keep] = packed
    return out


def make_keep(B, L, pattern, gen):
    if pattern == "random":
        return torch.rand(B, L, generator=gen) < 0.3
    if pattern == "all":
        return torch.ones(B, L, dtype=torch.bool)
    if pattern == "none":
        return torch.zeros(B, L, dtype=torch.bool)
    keep = torch.rand(B, L, generator=gen) < 0.5  # "mixed": first row all kept, second none
    keep[0] = True
    if B > 1:
        keep[1] = False
    return keep


# ---- pack / unpack ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("pattern", ["random", "all", "none", "mixed"])
def test_pack_unpack_match_reference(shape, dtype, pattern):
    gen = torch.Generator().manual_seed(hash((shape, pattern)) % 2**31)
    B, L, C = shape
    x = torch.randn(B, L, C, generator=gen).to(dtype)
    keep = make_keep(B, L, pattern, gen)
    packed, cu, max_len, index = packing.pack(x, keep)
    e_packed, e_cu, e_max, e_index = ref_pack(x, keep)
    assert packed.dtype == dtype and cu.dtype == torch.int32 and index.dtype == torch.int64
    assert isinstance(max_len, int) and max_len == e_max
    assert torch.equal(packed, e_packed)  # a copy: bit-exact in every dtype
    assert torch.equal(cu, e_cu) and torch.equal(index, e_index)

    fill = torch.randn(C, generator=gen).to(dtype)
    out = packing.unpack(packed, index, fill, (B, L))
    assert out.shape == (B, L, C) and out.dtype == dtype
    assert torch.equal(out, ref_unpack(packed, keep, fill))
    assert torch.equal(out, torch.where(keep[..., None], x, fill))


def test_pack_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9, 4, generator=gen).transpose(0, 1)  # [9, 6, 4], strided
    keep = (torch.rand(6, 9, generator=gen) < 0.5).t()
    packed, cu, max_len, index = packing.pack(x, keep)
    e = ref_pack(x, keep)
    assert torch.equal(packed, e[0]) and torch.equal(cu, e[1]) and max_len == e[2]
    wide = torch.randn(int(keep.sum()), 8, generator=gen)[:, ::2]  # strided packed rows
    assert torch.equal(packing.unpack(wide, index, torch.zeros(4), (9, 6)),
                       ref_unpack(wide, keep, torch.zeros(4)))


def test_unpack_fill_is_cast_and_accepts_int32_index():
    x = torch.randn(2, 5, 3, dtype=torch.bfloat16)
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    packed, _, _, index = packing.pack(x, keep)
    fill = torch.tensor([1.0, 2.0, 3.0])  # fp32 fill, bf16 data
    out = packing.unpack(packed, index.int(), fill, (2, 5))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref_unpack(packed, keep, fill.bfloat16()))


def test_roundtrip_b1_large_batch():
    gen = torch.Generator().manual_seed(2)
    for B, L, C in [(1, 196, 32), (300, 7, 3)]:
        x = torch.randn(B, L, C, generator=gen)
        keep = torch.rand(B, L, generator=gen) < 0.25
        packed, cu, max_len, index = packing.pack(x, keep)
        assert int(cu[-1]) == packed.shape[0] == int(keep.sum())
        assert torch.equal(packing.unpack(packed, index, torch.zeros(C), (B, L)),
                           x * keep[..., None])


# ---- gradients --------------------------------------------------------------------------------
def test_gradcheck_pack_and_unpack():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(3, 5, generator=gen) < 0.5
    keep[1] = False
    assert torch.autograd.gradcheck(lambda x: packing.pack(x, keep)[0], (x,))
    _, _, _, index = packing.pack(x.detach(), keep)
    packed = torch.randn(index.numel(), 4, generator=gen, dtype=torch.float64, requires_grad=True)
    fill = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, f: packing.unpack(p, index, f, (3, 5)), (packed, fill))
    assert torch.autograd.gradgradcheck(lambda x: packing.pack(x, keep)[0], (x,))
    # second derivatives through unpack, fill's included (the fill gradient's own formula)
    assert torch.autograd.gradgradcheck(
        lambda x, f: packing.unpack(packing.pack(x, keep)[0] * 2, index, f, (3, 5)), (x, fill))


def test_fill_gradient_is_differentiable():
    """d(fill grad)/d(upstream grad) = 1 on every unkept position, 0 on the kept ones."""
    packed, fill = torch.zeros(2, 1, requires_grad=True), torch.zeros(1, requires_grad=True)
    index = torch.tensor([0, 4])
    g = torch.zeros(2, 3, 1, requires_grad=True)
    gf, = torch.autograd.grad(packing.unpack(packed, index, fill, (2, 3)), fill, g, create_graph=True)
    gg, = torch.autograd.grad(gf.sum(), g)
    assert torch.equal(gg.reshape(-1), torch.tensor([0.0, 1, 1, 1, 0, 1]))


def test_fill_gradient_sums_in_double():
    """The fill gradient (a sum over the unkept rows) is accumulated in double on the C++ and the
    plain-torch path alike: within half an fp32 ulp of the exact sum, not fp32's running error."""
    from tec_fast.packing.reference import _unkept_row_sum_reference
    gen = torch.Generator().manual_seed(6)
    grad = torch.randn(4096, 8, generator=gen) * torch.logspace(0, 4, 4096)[:, None]
    index = torch.arange(0, 4096, 2)
    exact = grad.double()[1::2].sum(0)
    ulp = torch.finfo(torch.float32).eps * exact.abs()
    for name, out in (("operator", torch.ops.tec_fast.unkept_row_sum(grad, index)),
                      ("reference", _unkept_row_sum_reference(grad, index))):
        assert out.dtype == torch.float32
        assert ((out.double() - exact).abs() <= ulp).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gradients_match_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    B, L, C = 4, 37, 19
    keep = torch.rand(B, L, generator=gen) < 0.4
    keep[2] = True
    x = torch.randn(B, L, C, generator=gen).to(dtype)
    fill = torch.randn(C, generator=gen).to(dtype)
    g_out = torch.randn(B, L, C, generator=gen).to(dtype)

    def run(pack_fn, unpack_fn):
        xx = x.clone().requires_grad_()
        ff = fill.clone().requires_grad_()
        packed = pack_fn(xx)
        (unpack_fn(packed * 2, ff) * g_out).sum().backward()
        return xx.grad, ff.grad

    _, _, _, index = packing.pack(x, keep)
    gx, gf = run(lambda t: packing.pack(t, keep)[0],
                 lambda p, f: packing.unpack(p, index, f, (B, L)))
    ex, ef = run(lambda t: t[keep], lambda p, f: ref_unpack(p, keep, f))
    assert torch.equal(gx, ex)  # scatter of copies: exact
    # the fill gradient is a sum over the unkept rows (accumulated in double, then rounded to
    # `dtype`): compare with an fp64 sum and allow only that final rounding
    exact = (g_out.double() * (~keep)[..., None]).sum((0, 1))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(gf.double(), exact, atol=tol * exact.abs().max().item(), rtol=tol)
    assert ef.dtype == gf.dtype


def test_opcheck_operators():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 4, generator=gen, requires_grad=True)
    keep = torch.rand(3, 6, generator=gen) < 0.5
    _, _, _, index = packing.pack(x.detach(), keep)
    packed = torch.randn(index.numel(), 4, generator=gen, requires_grad=True)
    fill = torch.randn(4, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.tec_fast.unpack.default, (packed, index, fill, 3, 6))
    torch.library.opcheck(torch.ops.tec_fast.gather_rows.default,
                          (torch.randn(18, 4, requires_grad=True), index))
    torch.library.opcheck(torch.ops.tec_fast.unkept_row_sum.default, (torch.randn(18, 4), index))
    torch.library.opcheck(torch.ops.tec_fast.position_ids.default, (index, 6, torch.tensor([2, 3, 1])))
    # pack's output size depends on the data: the fake kernel gives an unbacked size, which the
    # dynamic-shape AOT test cannot trace; the schema, fake and autograd registration tests run
    torch.library.opcheck(torch.ops.tec_fast.pack.default, (x, keep),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


# ---- bad inputs -------------------------------------------------------------------------------
def _raises(match, fn, *args):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_pack_bad_inputs():
    x = torch.randn(2, 5, 3)
    keep = torch.ones(2, 5, dtype=torch.bool)
    _raises(r"pack: x .*\(2, 15\)", packing.pack, x.reshape(2, 15), keep)
    _raises(r"pack: x .*torch.int64", packing.pack, x.long(), keep)
    _raises(r"pack: keep .*\(2, 5\).*torch.uint8", packing.pack, x, keep.to(torch.uint8))
    _raises(r"pack: keep .*\(2, 4\)", packing.pack, x, keep[:, :4])
    _raises(r"pack: keep .*list", packing.pack, x, [[True] * 5] * 2)
    # the operator itself checks too (direct torch.ops callers)
    _raises(r"keep", torch.ops.tec_fast.pack, x, keep[:, :4])


def test_unpack_bad_inputs():
    packed = torch.randn(4, 3)
    index = torch.tensor([0, 3, 7, 9])
    fill = torch.zeros(3)
    _raises(r"index\[2\] = 7 is outside \[0, 6\)", packing.unpack, packed, index, fill, (2, 3))
    _raises(r"index\[0\] = -1 is outside", packing.unpack, packed, torch.tensor([-1, 1, 2, 3]),
            fill, (2, 5))
    _raises(r"index holds position 1 twice \(index\[0\] and index\[1\]\)", packing.unpack, packed,
            torch.tensor([1, 1, 2, 3]), fill, (2, 5))
    # the check the public wrapper runs for CUDA tensors (whose kernel would keep the last row)
    from tec_fast.packing.reference import check_no_repeats
    _raises(r"unpack: index holds position 6 twice \(index\[1\] and index\[3\]\)", check_no_repeats,
            torch.tensor([0, 6, 2, 6]), 8, "unpack")
    check_no_repeats(torch.tensor([0, 6, 2, 7]), 8, "unpack")
    _raises(r"index must be .*\(4,\).*\(3,\)", packing.unpack, packed, index[:3], fill, (2, 5))
    _raises(r"index must be .*torch.float32", packing.unpack, packed, index.float(), fill, (2, 5))
    _raises(r"fill must be .*3 values.*\(4,\)", packing.unpack, packed, index, torch.zeros(4), (2, 5))
    _raises(r"shape must be \(B, L\)", packing.unpack, packed, index, fill, (10,))
    _raises(r"shape must be \(B, L\)", packing.unpack, packed, index, fill, (2, -5))
    _raises(r"packed must be .*\(4, 3, 1\)", packing.unpack, packed[..., None], index, fill, (2, 5))
    # direct operator calls check bounds too: no out-of-bounds read
    _raises(r"outside", torch.ops.tec_fast.unpack, packed, index, fill, 2, 3)
    _raises(r"outside", torch.ops.tec_fast.gather_rows, packed, torch.tensor([0, 4]))
    _raises(r"outside", torch.ops.tec_fast.gather_rows, packed, torch.tensor([-1]))
    _raises(r"outside", torch.ops.tec_fast.unkept_row_sum, packed, torch.tensor([5]))


# ---- plan_bins --------------------------------------------------------------------------------
def check_plan(bins, lengths, capacity):
    ids = sorted(i for b in bins for i in b)
    assert ids == list(range(len(lengths))), "every id exactly once"
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(load <= capacity for load in loads), "no bin over capacity"
    assert all(b for b in bins), "no empty bin"
    assert len(bins) >= math.ceil(sum(lengths) / capacity)
    # any-fit on decreasing sizes: a bin was opened only because its first item fitted nowhere,
    # so every two bins together hold more than capacity (else FFD would have merged them)
    if len(bins) >= 2 and sum(lengths) > 0:
        two = sorted(loads)[:2]
        assert two[0] + two[1] > capacity, f"two bins {two} could be merged (capacity {capacity})"


def test_plan_bins_property_random():
    rng = random.Random(0)
    for trial in range(200):
        capacity = rng.choice([1, 2, 7, 64, 100, 1024])
        n = rng.randint(0, 300)
        hi = rng.choice([capacity, max(1, capacity // 3), capacity // 2 + 1])
        lengths = [rng.randint(0 if trial % 5 == 0 else 1, hi) for _ in range(n)]
        bins = packing.plan_bins(lengths, capacity)
        check_plan(bins, lengths, capacity)
        assert bins == packing.plan_bins_reference(lengths, capacity), "C++ and Python plans differ"


def test_plan_bins_inputs_and_quality():
    assert packing.plan_bins([], 10) == []
    assert packing.plan_bins([0, 0], 10) == [[0, 1]]
    assert packing.plan_bins([10, 10], 10) == [[0], [1]]
    # perfect fit exists: 6+4, 7+3, 5+5
    bins = packing.plan_bins([6, 4, 7, 3, 5, 5], 10)
    assert len(bins) == 3
    import numpy as np
    lengths = [5, 3, 9, 1]
    expected = packing.plan_bins(lengths, 9)
    for form in (tuple(lengths), torch.tensor(lengths), torch.tensor(lengths, dtype=torch.int32),
                 np.array(lengths)):
        assert packing.plan_bins(form, 9) == expected
    assert packing.plan_bins(lengths, np.int64(9)) == expected
    rng = random.Random(1)
    lengths = [rng.randint(16, 256) for _ in range(20000)]
    bins = packing.plan_bins(lengths, 1024)
    check_plan(bins, lengths, 1024)
    assert sum(lengths) / (len(bins) * 1024) > 0.99


def test_plan_bins_bad_inputs():
    _raises(r"lengths\[1\] = 12 exceeds capacity 10", packing.plan_bins, [3, 12, 4], 10)
    import numpy as np
    _raises(r"capacity must be a positive int64, got 9223372036854775808", packing.plan_bins, [1], 2 ** 63)
    _raises(r"lengths\[1\] = 9223372036854775813 does not fit in int64", packing.plan_bins,
            np.array([1, 2 ** 63 + 5], dtype=np.uint64), 10)
    _raises(r"lengths\[2\] = -1 is negative", packing.plan_bins, [3, 1, -1], 10)
    _raises(r"lengths\[0\] = 11 exceeds", packing.plan_bins, torch.tensor([11]), 10)
    _raises(r"capacity must be a positive", packing.plan_bins, [1], 0)
    _raises(r"capacity must be a positive", packing.plan_bins, [1], 2.5)
    _raises(r"lengths must be a 1-D sequence of ints.*float", packing.plan_bins, [1.5, 2], 10)
    _raises(r"lengths must be a 1-D sequence of ints.*\(2, 2\)", packing.plan_bins, [[1, 2], [3, 4]], 10)
    _raises(r"lengths must be a 1-D sequence of ints", packing.plan_bins, ["a"], 10)
    _raises(r"lengths\[1\] = 12 exceeds capacity 10", packing.plan_bins_reference, [3, 12], 10)


# ---- position ids -----------------------------------------------------------------------------
def test_position_ids():
    gen = torch.Generator().manual_seed(6)
    B, L = 3, 12
    keep = torch.rand(B, L, generator=gen) < 0.6
    _, _, _, index = packing.pack(torch.zeros(B, L, 1), keep)
    j = index % L
    pos = packing.position_ids(index, L, 4)  # a 3x4 grid for every image
    assert pos.dtype == torch.int64 and pos.shape == (index.numel(), 2)
    assert torch.equal(pos, torch.stack([j // 4, j % 4], 1))
    widths = [4, 3, 6]  # per image: 3x4, 4x3, 2x6
    w = torch.tensor(widths)[index // L]
    expected = torch.stack([j // w, j % w], 1)
    assert torch.equal(packing.position_ids(index, L, widths), expected)
    assert torch.equal(packing.position_ids(index, L, torch.tensor(widths)), expected)
    assert torch.equal(packing.position_ids_reference(index, L, torch.tensor(widths)), expected)
    _raises(r"index\[.*outside \[0, 24\)", packing.position_ids, index, L, [4, 3])
    _raises(r"grid_w\[1\] = 0 must be positive", packing.position_ids, index, L, [4, 0, 2])
    _raises(r"seq_len must be a positive int", packing.position_ids, index, 0, 4)
    _raises(r"grid_w must be an int", packing.position_ids, index, L, [2.0, 3.0, 1.0])
    _raises(r"index must be a 1-D int64", packing.position_ids, index.float(), L, 4)


# ---- the extension and the fallback -----------------------------------------------------------
def _extension_opted_out() -> bool:
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("TEC_FAST_NO_EXT", "TEC_FAST_NO_EXT_BUILD"))


def test_extension_loaded():
    """The install builds the C++ extension (it fails otherwise); only an explicit opt-out
    (TEC_FAST_NO_EXT_BUILD=1 at install, TEC_FAST_NO_EXT=1 at run time) may leave it out."""
    status = packing.extension_status()
    assert set(status) >= {"built", "loaded", "cuda", "reason", "built_for", "present"}
    if _extension_opted_out():
        pytest.skip("the extension is switched off by TEC_FAST_NO_EXT / TEC_FAST_NO_EXT_BUILD")
    assert status["built"] and status["loaded"], status["reason"]
    assert packing.backend("cpu").startswith("C++ extension")


def test_unpack_size_overflow_is_refused():
    packed, index, fill = torch.randn(1, 4), torch.tensor([0]), torch.zeros(4)
    _raises(r"overflows int64", torch.ops.tec_fast.unpack, packed, index, fill, 2 ** 40, 2 ** 30)
    _raises(r"overflows int64", torch.ops.tec_fast.unpack, packed, index, fill, 2 ** 31, 2 ** 31)


def test_reference_path_passes_the_same_tests():
    """The plain-torch fallback raises the same errors and computes the same results: this file
    again, with the extension switched off."""
    if _extension_opted_out():
        pytest.skip("already running on the reference path")
    env = dict(os.environ, TEC_FAST_NO_EXT="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           __file__, "-k", "not reference_path_passes and not gpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _run(script: str, env_extra: dict, cwd=None) -> str:
    env = dict(os.environ, **env_extra)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                         text=True, env=env, cwd=cwd or ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


FALLBACK_CHECK = """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        from tec_fast import packing
    print("WARNINGS", len([w for w in caught if "tec_fast.packing" in str(w.message)]))
    for w in caught:
        if "tec_fast.packing" in str(w.message):
            print("MESSAGE", w.message)
    print("BACKEND", packing.backend("cpu"))
    assert not packing.extension_status()["loaded"]
    assert not torch.cuda.is_initialized()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(3, 7, generator=g) < 0.5
    keep[0] = False
    packed, cu, max_len, index = packing.pack(x, keep)
    assert torch.equal(packed, x[keep]) and max_len == int(keep.sum(1).max())
    assert torch.equal(cu[1:].long(), keep.sum(1).cumsum(0))
    fill = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    out = packing.unpack(packed, index, fill, (3, 7))
    assert torch.equal(out, torch.where(keep[..., None], x, fill))
    assert torch.autograd.gradcheck(lambda x, f: packing.unpack(packing.pack(x, keep)[0], index, f,
                                                                (3, 7)), (x, fill))
    for bad in (lambda: packing.unpack(packed, index + 100, fill, (3, 7)),
                lambda: packing.plan_bins([1, 20], 10)):
        try:
            bad()
            raise AssertionError("no ValueError")
        except ValueError:
            pass
    assert packing.plan_bins([5, 3, 7, 2, 8], 10) == [[4, 3], [2, 1], [0]]
    print("OK")
"""


def test_fallback_when_extension_forced_off():
    out = _run(FALLBACK_CHECK, {"TEC_FAST_NO_EXT": "1"})
    assert "OK" in out and "WARNINGS 0" in out and "plain-torch reference" in out


def test_missing_or_mismatched_extension_is_one_warning(tmp_path):
    """A copy of the packing package in a bare package: no build record, then one for another torch."""
    pkg = tmp_path / "tec_fast"
    (pkg / "packing").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for src in (ROOT / "tec_fast" / "packing").glob("*.py"):
        (pkg / "packing" / src.name).write_text(src.read_text())
    env = {"PYTHONPATH": str(tmp_path), "TEC_FAST_NO_EXT": "0"}
    out = _run(FALLBACK_CHECK, env, cwd=tmp_path)
    assert "OK" in out and "WARNINGS 1" in out and "_build_info.json not found" in out
    (pkg / "_build_info.json").write_text(json.dumps(
        {"cpu": {"built": True}, "cuda": {"built": False}, "torch": "1.13.1", "torch_cuda": None}))
    out = _run(FALLBACK_CHECK, env, cwd=tmp_path)
    assert "OK" in out and "WARNINGS 1" in out
    assert "built for torch 1.13.1" in out and torch.__version__ in out
    (pkg / "_build_info.json").write_text(json.dumps(
        {"cpu": {"built": True}, "cuda": {"built": False}, "torch": torch.__version__,
         "torch_cuda": None}))
    # a build whose module does not load (as a .so built for another torch fails to)
    (pkg / "_C.py").write_text("raise ImportError('undefined symbol: _ZN3c104fake')\n")
    out = _run(FALLBACK_CHECK, env, cwd=tmp_path)
    assert "OK" in out and "WARNINGS 1" in out and "does not load" in out
    assert "undefined symbol" in out


# ---- GPU (run whenever a device is lent) ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype):
    gen = torch.Generator().manual_seed(7)
    for B, L, C in SHAPES + [(300, 7, 3), (4, 1000, 6)]:
        x = torch.randn(B, L, C, generator=gen).to(dtype)
        keep = torch.rand(B, L, generator=gen) < 0.4
        keep[0] = False
        got = packing.pack(x.cuda(), keep.cuda())
        e_packed, e_cu, e_max, e_index = ref_pack(x, keep)
        assert torch.equal(got[0].cpu(), e_packed) and torch.equal(got[1].cpu(), e_cu)
        assert got[2] == e_max and torch.equal(got[3].cpu(), e_index)
        fill = torch.randn(C, generator=gen).to(dtype)
        out = packing.unpack(got[0], got[3], fill.cuda(), (B, L))
        assert torch.equal(out.cpu(), ref_unpack(e_packed, keep, fill))
        g = torch.randn(B, L, C, generator=gen).to(dtype)
        gf = torch.ops.tec_fast.unkept_row_sum(g.cuda().reshape(-1, C), got[3]).cpu()
        exact = (g.double() * (~keep)[..., None]).sum((0, 1))
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
        torch.testing.assert_close(gf.double(), exact, atol=tol * (1 + exact.abs().max().item()),
                                   rtol=tol)
        pos = packing.position_ids(got[3], L, 5).cpu()
        assert torch.equal(pos, packing.position_ids(e_index, L, 5))


@pytest.mark.gpu
def test_cuda_gradients_and_bad_index():
    assert packing.extension_status()["cuda"] or not packing.extension_status()["cuda_built"]
    x = torch.randn(3, 5, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    keep = torch.rand(3, 5, device="cuda") < 0.5
    _, _, _, index = packing.pack(x.detach(), keep)
    fill = torch.randn(4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, f: packing.unpack(packing.pack(x, keep)[0] * 3, index, f, (3, 5)), (x, fill))
    packed = torch.randn(index.numel(), 4, device="cuda")
    _raises("outside", packing.unpack, packed, index + 100, torch.zeros(4, device="cuda"), (3, 5))


# ---- benchmark smoke --------------------------------------------------------------------------
def test_benchmark_smoke(tmp_path):
    from benchmarks import bench_packing
    rows = bench_packing.main(["--small", "--results-dir", str(tmp_path)])
    lines = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(lines) == len(rows) >= 4
    keys = {"bench", "provider", "device", "shape", "dtype", "median_ms", "p20_ms", "p80_ms",
            "peak_mem_gb", "torch", "commit", "timestamp", "speedup"}
    assert all(keys <= set(row) for row in lines)
    assert {row["bench"] for row in lines} == {"plan_bins", "pack", "unpack"}
