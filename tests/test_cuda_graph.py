"""capture_step's argument checks (CPU; the recording itself is tested in test_step_gpu.py)."""
import pytest
import torch

from tec_fast.training.cuda_graph import capture_step


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        capture_step(lambda: None, warmup=0)


def test_optimizer_must_be_capturable():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], capturable=False)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has capturable=False"):
        capture_step(lambda: None, opt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_needs_cuda():
    calls = []
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        capture_step(lambda: calls.append(1))
    assert not calls  # nothing ran
