"""CI gate: every Triton kernel compiles offline for sm_90 through its launcher at ViT-B and ViT-L
training shapes (bf16; ViT-B in fp32 too) without register spills and within the target's shared memory
(``benchmarks/compile_report.py``; no GPU needed). Never a speed threshold."""
import json
import os
import subprocess
import sys

from conftest import ptxas_or_skip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sm90_vitb_vitl_bf16_no_spills_smem_within_limit(tmp_path):
    ptxas_or_skip(90)
    out = tmp_path / "compile.jsonl"
    run = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--sizes", "vitb,vitl", "--arch", "90", "--dtype", "bf16",
                          "--out", str(out), "--check", "--require-all"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, f"compile gate failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from benchmarks.compile_report import all_kernels
    kernels = set(all_kernels())
    for size in ("vitb", "vitl"):
        got = {r["kernel"] for r in rows if r["shape"] == size}
        assert kernels <= got, f"{size}: kernels not compiled: {sorted(kernels - got)}"
    for r in rows:
        assert r["target"] == "cuda:sm_90a" and r["dtype"] == "bf16"
        assert 0 < r["registers"] <= 255 and r["num_warps"] >= 1
        assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
        assert r["smem_bytes"] <= r["smem_limit"] == 227 * 1024, r
        for key in ("triton", "commit", "constexprs", "stack_bytes", "ptxas"):
            assert key in r, key
        assert r["sass_instructions"] is None or r["sass_instructions"] > 0  # None: no nvdisasm
    gelu = [r for r in rows if r["kernel"] == "_mlp_gelu_fwd_kernel" and r["sass_instructions"]]
    for r in gelu:  # loop-free: every element costs instructions (exact erf), a few per element at least
        per_element = r["sass_instructions"] / (r["constexprs"]["BLOCK"] / (32 * r["num_warps"]))
        assert 5 < per_element < 200, r


def test_sm90_vitb_fp32_no_spills(tmp_path):
    """fp32 (``--precision fp32``; exact FMA products hold more per thread): the same gate at ViT-B.
    A fp32 tile that spilled under another Triton version was found only by hand."""
    ptxas_or_skip(90)
    out = tmp_path / "compile.jsonl"
    run = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--sizes", "vitb", "--arch", "90",
                          "--dtype", "fp32", "--out", str(out), "--check", "--require-all"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, f"compile gate failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from benchmarks.compile_report import all_kernels
    assert set(all_kernels()) <= {r["kernel"] for r in rows}
    assert all(r["dtype"] == "fp32" and r["spill_store_bytes"] == r["spill_load_bytes"] == 0 for r in rows)


def test_ptxas_log_parsing_and_gate():
    from benchmarks.compile_report import parse_ptxas_log, problems
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_adapter_ln_in_bwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _adapter_ln_in_bwd_kernel
    560 bytes stack frame, 676 bytes spill stores, 616 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 560 bytes cumulative stack size, 1024 bytes smem, 380 bytes cmem[0]
"""
    use = parse_ptxas_log(log)
    assert (use.registers, use.spill_store_bytes, use.spill_load_bytes, use.stack_bytes,
            use.static_smem_bytes) == (128, 676, 616, 560, 1024)
    clean = dict(target="cuda:sm_90a", shape="vitb", dtype="bf16", op="x", kernel="k", registers=40,
                 spill_store_bytes=0, spill_load_bytes=0, stack_bytes=0, smem_bytes=1000, smem_limit=227 * 1024)
    assert problems([clean]) == []
    assert problems([dict(clean, spill_store_bytes=4)]) and problems([dict(clean, spill_load_bytes=4)])
    assert problems([dict(clean, smem_bytes=227 * 1024 + 1)])
    assert problems([dict(clean, kernel=None, error="CompilationError: boom")])


def test_registered_kernel_that_cannot_be_found_fails_the_gate(monkeypatch):
    """A registry row whose kernel module is missing is an error row (never a skip), so an op
    cannot escape the no-spill gate by not being found."""
    ptxas_or_skip(90)
    from benchmarks import compile_report
    from tec_fast.ops.registry import OPS, OpSpec
    fake = OpSpec("no_such_op", "no_such_kernel_module", (1,), OPS["layer_norm"].example)
    monkeypatch.setattr(compile_report, "OPS", {**OPS, "no_such_op": fake})
    rows = compile_report.compile_rows(90, "vitb", "bf16", ops=["no_such_op"])
    assert len(rows) == 1 and "no_such_kernel_module" in rows[0]["error"] and "does not import" in rows[0]["error"]
    bad = compile_report.problems(rows)
    assert len(bad) == 1 and "no_such_op" in bad[0]


def test_cases_come_from_the_registry():
    from benchmarks import compile_report
    from tec_fast.ops.registry import OPS
    assert set(compile_report.CASES) == set(OPS)
    assert set(compile_report.KERNEL_MODULES) == {spec.kernel for spec in OPS.values()}
