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


def test_fit_names_what_stands_in_the_way():
    from tec_fast.training import FitConfig
    from tec_fast.training.graphed import graph_reasons

    cfg = FitConfig(accum=2, precision="fp16", compile=True, cuda_graph=True)
    variable = type("Objective", (), {"variable": True, "cache": object()})()
    reasons = graph_reasons(cfg, torch.device("cpu"), 2, "apex.optimizers.FusedAdam (adam_w_mode)", True, variable)
    for words in ("CUDA device", "one process", "accum 1", "fp16", "fused AdamW", "fixed size", "compile",
                  "one fixed mask ratio", "TargetCache"):
        assert any(words in r for r in reasons), (words, reasons)
    ok = FitConfig(cuda_graph=True, precision="bf16")
    assert graph_reasons(ok, torch.device("cuda"), 1, "torch.optim.AdamW (fused)", False) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_fit_refuses_cuda_graph_on_cpu():
    from torch.utils.data import TensorDataset

    from tec_fast.training import FitConfig, fit
    from train_helpers import tiny_objective, tiny_tec

    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="cuda_graph: cannot record this run's step: it needs a CUDA device"):
        fit(tiny_tec(), tiny_objective(), data, FitConfig(batch_size=4, max_steps=1, progress=False,
                                                           cuda_graph=True))


def test_set_lr_overwrites_a_tensor_lr_in_place():
    from tec_fast.training.optim import set_lr

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    opt.param_groups[0]["lr"] = lr = torch.tensor(1e-3)
    set_lr(opt, 5e-4)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(5e-4)
    plain = torch.optim.AdamW([p], lr=1e-3)
    set_lr(plain, 2e-4)
    assert plain.param_groups[0]["lr"] == 2e-4


def test_recorded_batch_shape_is_checked():
    from tec_fast.training.graphed import _clone, _copy_into

    static = _clone((torch.zeros(4, 3), {"m": torch.zeros(4)}))
    _copy_into(static, (torch.ones(4, 3), {"m": torch.ones(4)}))
    assert static[0].sum() == 12 and static[1]["m"].sum() == 4
    with pytest.raises(ValueError, match=r"shape \(3, 3\) does not fit the recorded shape \(4, 3\)"):
        _copy_into(static, (torch.ones(3, 3), {"m": torch.ones(4)}))
    with pytest.raises(TypeError, match="cannot hold a batch item of type str"):
        _clone(("a",))
