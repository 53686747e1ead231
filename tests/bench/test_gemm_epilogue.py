"""The GEMM-epilogue probe (benchmarks/gemm_epilogue.py): its Triton GEMMs (per-tile and
persistent) compute act(x W^T + b) (interpreter, awkward shapes: partial tiles in M, N and K),
refuse bad operands, and its command line explains itself and asks for a GPU (or --offline)
before timing anything."""
import pytest
import torch

from benchmarks import gemm_epilogue as probe
from conftest import assert_close


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("M,K,N", [(37, 40, 48), (5, 16, 70)])
def test_linear_act_matches_torch(triton_path, dtype, tol, gelu, M, K, N):
    g = torch.Generator().manual_seed(M + N)
    x = (torch.randn(M, K, generator=g) * 2).to(dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype)
    out = probe.linear_act(x, w, b, gelu)
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close(out.float(), probe.reference(x, w, b, gelu).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("M,K,N,programs", [(37, 40, 48, 1), (37, 40, 48, 3), (5, 16, 72, 8)])
def test_persistent_matches_torch(triton_path, dtype, tol, gelu, M, K, N, programs):
    """Fewer programs than tiles (each walks several), more than tiles, partial tiles everywhere."""
    g = torch.Generator().manual_seed(M + N)
    x = (torch.randn(M, K, generator=g) * 2).to(dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype)
    out = probe.linear_act_persistent(x, w, b, gelu, programs=programs)
    assert_close(out.float(), probe.reference(x, w, b, gelu).float(), atol=tol, rtol=tol)


def test_linear_act_refuses_bad_operands(triton_path):
    with pytest.raises(ValueError, match="16-byte aligned"):
        probe.linear_act_persistent(torch.randn(4, 8).bfloat16(), torch.randn(6, 8).bfloat16(),
                                    torch.randn(6).bfloat16(), True)
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        probe.linear_act(x, w[:, :7], b, True)
    with pytest.raises(ValueError, match="one dtype"):
        probe.linear_act(x, w.double(), b, True)


def test_cli_help_and_gpu_required(capsys):
    with pytest.raises(SystemExit) as e:
        probe.main(["--help"])
    assert e.value.code == 0 and "--offline" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            probe.main(["--device", "cpu"])
        assert e.value.code == 2 and "--offline" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_variants_compute_the_same(cuda_triton_path):
    """Both variants compiled for the GPU with the probe's first tile (the others are checked by
    the probe itself, against cuBLAS + GELU), on a shape with partial tiles."""
    config = probe.GPU_CONFIGS[0]
    g = torch.Generator(device="cuda").manual_seed(0)
    M, K, N = 1000, 200, 520
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    b = torch.randn(N, device="cuda", generator=g).bfloat16()
    for launch in probe.VARIANTS.values():
        for gelu in (False, True):
            out = launch(x, w, b, gelu, config)
            assert_close(out.float(), probe.reference(x, w, b, gelu).float(), atol=3e-2, rtol=2e-2)


def test_timing_loop_writes_a_row_per_provider(triton_path, monkeypatch, tmp_path):
    """``run_gpu``'s bookkeeping on CPU (interpreter, tiny shapes, one tile): every provider
    timed, fused results checked against cuBLAS + GELU, rows appended per shape."""
    monkeypatch.setattr(probe, "SHAPES", {"tiny": lambda B: (B * 3, 16, 24)})
    monkeypatch.setattr(probe, "GPU_CONFIGS", (probe.INTERPRETER_CONFIG,))
    rows = probe.run_gpu(5, torch.device("cpu"), str(tmp_path))
    providers = {r["provider"] for r in rows}
    assert providers == {"cublas+gelu", "cublas", "triton", "triton+gelu", "persistent", "persistent+gelu"}
    for r in rows:
        assert r["bench"] == "gemm_epilogue" and r["shape"] == "M=15,K=16,N=24" and r["median_ms"] > 0
        fused = r["provider"].endswith("+gelu") and r["provider"] != "cublas+gelu"
        assert (r["max_abs_diff_vs_cublas_gelu"] is not None) == fused
        if fused:
            assert r["max_abs_diff_vs_cublas_gelu"] < 5e-2  # bf16: pre rounded before GELU or not
    (path,) = tmp_path.glob("*.jsonl")
    assert len(path.read_text().splitlines()) == len(rows)
