"""``python -m tec_fast.info --gpu CLASS`` on any machine: the op choices of that class's
measured table, its forward and forward + backward ratios (reference time / Triton time) in the
right columns, '-' where nothing was skipped, and the settings lines."""
from __future__ import annotations

import re

import pytest

from tec_fast.cli.info import collect, main
from tec_fast.ops import dispatch

MEASURED = sorted(dispatch.load_tables())
pytestmark = pytest.mark.skipif(not MEASURED, reason="no measured table shipped")


def test_a_measured_class_gives_its_choices_and_ratios_even_off_that_gpu(monkeypatch):
    monkeypatch.delenv("TEC_FAST_KERNELS", raising=False)  # auto: the choices the table makes
    gpu = MEASURED[0]
    info = collect(gpu)
    assert info["gpu_class"] == gpu
    chosen = [op for op, d in info["ops"].items() if d["backend"] == "triton"]
    assert chosen, info["ops"]  # the shipped table makes auto choose Triton somewhere
    for op in chosen:
        d = info["ops"][op]
        assert d["skipped_because"] == []
        assert d["measured_fwd"]["pass"] == "forward"
        if d["measured_fwdbwd"] is not None:
            assert d["measured_fwdbwd"]["pass"] == "forward + backward"


def test_the_table_prints_ratios_as_reference_over_triton_time(capsys, monkeypatch):
    monkeypatch.delenv("TEC_FAST_KERNELS", raising=False)
    gpu = MEASURED[0]
    info = collect(gpu)
    assert main(["--gpu", gpu]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.split()}
    assert lines["kernel_mode"].split() == ["kernel_mode", dispatch.kernel_mode()]
    for op, d in info["ops"].items():
        cols = lines[op].split(None, 4)
        for col, m in zip(cols[2:4], (d["measured_fwd"], d["measured_fwdbwd"])):
            if m is None:
                assert col == "-"
            else:
                assert col.endswith("x") and abs(float(col[:-1]) - m["reference_ms"] / m["triton_ms"]) <= 0.006, col
        why = cols[4] if len(cols) > 4 else ""
        assert why == ("; ".join(d["skipped_because"]) or "-")
        assert re.fullmatch(r"(triton|reference)", cols[1])


def test_packing_names_each_devices_backend():
    from tec_fast import packing
    info = collect()
    assert info["packing"] == {"cpu": packing.backend("cpu"), "cuda": packing.backend("cuda")}
