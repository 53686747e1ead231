"""The GEMM-epilogue probe (benchmarks/gemm_epilogue.py): its Triton GEMM computes act(x W^T + b)
(interpreter, awkward shapes: partial tiles in M, N and K), refuses bad operands, and its
command line explains itself and asks for a GPU (or --offline) before timing anything."""
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


def test_linear_act_refuses_bad_operands(triton_path):
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
@pytest.mark.parametrize("config", probe.GPU_CONFIGS)
def test_gpu_configs_compute_the_same(cuda_triton_path, config):
    """Every tile configuration the probe times, compiled for the GPU, on a shape with partial
    tiles: bias + exact GELU in the epilogue against fp32 torch."""
    g = torch.Generator(device="cuda").manual_seed(0)
    M, K, N = 1000, 200, 520
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    b = torch.randn(N, device="cuda", generator=g).bfloat16()
    for gelu in (False, True):
        out = probe.linear_act(x, w, b, gelu, config)
        assert_close(out.float(), probe.reference(x, w, b, gelu).float(), atol=3e-2, rtol=2e-2)
