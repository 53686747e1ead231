"""A whole TEC training step on CUDA makes no host synchronisation, can be captured in a CUDA
graph, and trains as the eager step when replayed (runs whenever a GPU is lent; the same step on
fake tensors is tests/bench/test_traffic.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast.training.cuda_graph import capture_step

pytestmark = pytest.mark.gpu


def _models():
    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2)
    torch.manual_seed(0)
    base = BaseModel(vit, topk=3).cuda().to(torch.bfloat16)
    model = TECModel(TECConfig(encoder=vit, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                               num_adapters=1)).cuda()
    return base, model


def _step(base, model, images, noise):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, base(images), mask_ratio=0.75, noise=noise)
    out["loss"].backward()
    return out["loss"]


def test_step_makes_no_host_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base, model = _models()
    images, noise = torch.randn(4, 3, 32, 32, device="cuda"), torch.rand(4, 16, device="cuda")
    _step(base, model, images, noise)  # warm-up: compiles the Triton kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(base, model, images, noise)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_step_captures_in_a_cuda_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base, model = _models()
    images, noise = torch.randn(4, 3, 32, 32, device="cuda"), torch.rand(4, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            _step(base, model, images, noise)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        loss = _step(base, model, images, noise)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)


def test_captured_step_matches_eager_steps():
    """capture_step: the recorded step, replayed, trains exactly as the same steps run eagerly
    (fixed masking noise, the same kernels); the warm-up calls count as steps."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base, model = _models()
    twin = copy.deepcopy(model)
    images, noise = torch.randn(4, 3, 32, 32, device="cuda"), torch.rand(4, 16, device="cuda")

    def body(m, opt):
        opt.zero_grad(set_to_none=True)
        loss = _step(base, m, images, noise)
        opt.step()
        return loss

    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=True) for m in (model, twin)]
    step = capture_step(lambda: body(model, opts[0]), opts[0], warmup=2)
    for _ in range(3):
        loss = step()
    for _ in range(2 + 3):
        eager_loss = body(twin, opts[1])
    torch.cuda.synchronize()
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6), (loss.item(), eager_loss.item())
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("mode,accum", [("on", 1), ("auto", 2)])
def test_fit_with_cuda_graph_trains_as_eager(tmp_path, mode, accum):
    """fit with graphs (required, or the default 'auto'): the first step eager, then the recorded
    micro-step(s) and optimizer step replayed; losses and weights follow the eager run (the lr is
    a GPU tensor there, so the last bits may differ), gradient clipping and accumulation included,
    and the checkpoint is written. The CPU twin with the recording emulated is
    tests/training/test_cuda_graph.py."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import numpy as np
    from torch.utils.data import TensorDataset

    from tec_fast.training import FitConfig, fit
    from train_helpers import tiny_base, tiny_objective, tiny_tec

    data = TensorDataset(torch.randn(32, 3, 16, 16), torch.zeros(32, dtype=torch.long))
    runs = {}
    for graph in ("off", mode):
        cfg = FitConfig(max_steps=6, batch_size=8, accum=accum, lr=1e-3, warmup_steps=2, clip_grad=1.0,
                        precision="bf16", progress=False, seed=0, cuda_graph=graph,
                        output_dir=str(tmp_path / f"graph_{graph}"))
        runs[graph] = fit(tiny_tec(), tiny_objective(tiny_base().cuda()), data, cfg)
    eager, graphed = runs["off"], runs[mode]
    assert graphed.steps == 6 and graphed.checkpoint and "grad_norm" in graphed.metrics
    assert graphed.cuda_graph.startswith("replayed: 5 step(s)"), graphed.cuda_graph
    np.testing.assert_allclose(graphed.losses, eager.losses, rtol=5e-3)
    # parameters with no true gradient (attention key biases) take Adam steps of up to the lr on
    # rounding noise that the two runs round differently: bound by the steps taken
    for (name, p), q in zip(graphed.model.named_parameters(), eager.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-2, atol=6 * 1e-3), name
