"""The traffic model (benchmarks/traffic.py) counts what it claims, on fake tensors, in seconds."""
import json
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import traffic


def _count(fn):
    counter = traffic.TrafficCounter()
    with FakeTensorMode():
        with counter:
            fn()
    return counter.count


def test_known_op_bytes_flops_and_free_views():
    def fn():
        a = torch.empty(64, 32, dtype=torch.bfloat16)
        b = torch.empty(16, 32, dtype=torch.bfloat16).t()  # a view: free
        torch.mm(a, b)
        torch.empty(1, 32).expand(64, 32).clone()          # reads the 32 stored values once
    records = _count(fn).records
    assert [r.op for r in records] == ["aten.mm", "aten.clone"]
    mm, clone = records
    assert (mm.read, mm.written, mm.flops, mm.launches) == ((64 * 32 + 32 * 16) * 2, 64 * 16 * 2, 2 * 64 * 32 * 16, 1)
    assert (clone.read, clone.written) == (32 * 4, 64 * 32 * 4)


def test_in_place_and_gather_traffic():
    def fn():
        x = torch.empty(8, 100)
        x.add_(1.0)                                        # read and write x
        torch.gather(x, 1, torch.zeros(8, 5, dtype=torch.int64))  # reads 40 of the 800 values
    add, zeros, gather = _count(fn).records
    assert (add.read, add.written) == (3200, 3200)
    assert zeros.op == "aten.zeros" and zeros.read == 0
    assert (gather.read, gather.written) == (8 * 5 * 4 + 8 * 5 * 8, 8 * 5 * 4)


def test_peak_memory_follows_storage_lifetimes():
    def fn():
        a = torch.empty(1000)      # 4 KB, freed below
        b = a * 2                  # 8 KB live
        del a, b
        torch.empty(500) + 1       # 4 KB at most
    count = _count(fn)
    assert count.peak_bytes == 8000


def test_host_sync_is_recorded():
    counter = traffic.TrafficCounter()
    with FakeTensorMode():
        x = torch.empty(4)
        with counter, pytest.raises(Exception):
            x.sum().item()  # data-dependent: FakeTensorMode refuses it, the counter saw it first
    assert counter.count.host_syncs and "_local_scalar_dense" in counter.count.host_syncs[0]


def test_cuda_autocast_policy_is_scoped():
    def ln_dtype():
        with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.nn.functional.linear(torch.empty(4, 8), torch.empty(8, 8))
            parts = [h, torch.empty(4, 8)]
            return (torch.nn.functional.layer_norm(h, (8,)).dtype, h.softmax(-1).dtype,
                    torch.stack(parts).dtype)
    before = ln_dtype()
    with traffic.cuda_autocast_policy():
        inside = ln_dtype()
    assert inside == (torch.float32, torch.float32, torch.float32)  # CUDA: fp32 LN and softmax
    assert ln_dtype() == before and before[:2] == (torch.bfloat16, torch.bfloat16)


def test_tiny_step_engine_uses_fused_ops_and_moves_fewer_bytes():
    env = {k: os.environ.get(k) for k in ("TEC_FAST_KERNELS", "TRITON_INTERPRET")}
    engine = traffic.count_step("engine", "tiny", 4)
    eager = traffic.count_step("eager", "tiny", 4)
    assert {k: os.environ.get(k) for k in env} == env  # the switches are restored
    used = set(engine.custom_ops())
    for op in ("masked_gather", "scatter_masked", "patch_norm_mse", "relation_loss", "relation_targets",
               "encoder_adapter"):
        assert f"tec_fast.{op}" in used and f"tec_fast.{op}" not in eager.custom_ops(), op
    assert "tec_fast.encoder_adapter_backward" in used  # backward through the custom ops too
    # the adapter is counted by what runs inside it: its Triton kernels and its GEMMs
    inner = {r.op for r in engine.records}
    assert {"triton._adapter_ln_in_fwd_kernel", "triton._adapter_ln_in_bwd_kernel", "triton._gemm_kernel"} <= inner
    assert sum(r.flops for r in engine.records if r.op == "triton._gemm_kernel") > 0  # its products' FLOPs
    assert not any(r.launches or r.read for r in engine.records if r.op.startswith("tec_fast.encoder_adapter"))
    assert {"tec_fast.mlp_gelu", "tec_fast.mlp_gelu_backward"} <= used  # every block's MLP
    assert not engine.host_syncs, engine.host_syncs     # whole step on fake tensors, no host sync
    phases = {r.phase for r in engine.records}
    assert phases == {"base forward", "forward", "backward", "optimizer"}
    assert engine.peak_bytes > 0 and 0 < engine.saved_bytes <= engine.peak_bytes
    assert engine.bytes < eager.bytes
    assert engine.flops == pytest.approx(eager.flops, rel=0.05)  # the same math, counted both ways
    h200 = traffic.HARDWARE["H200"]
    assert engine.roofline_ms(*h200) > engine.roofline_ms(*h200, launch_us=0.0) > 0
    # the floor drops exactly the glue: adds, casts, layout copies and reductions
    glue = [r for r in engine.records if traffic.category(r.op) not in traffic.FLOOR_CATEGORIES]
    assert glue and {traffic.category(r.op) for r in glue} >= {"add / mul / div", "dtype casts"}
    glue_ms = sum(1e3 * max((r.read + r.written) / h200[0], r.flops / h200[1]) + 1e-3 * traffic.LAUNCH_US * r.launches
                  for r in glue)
    assert engine.floor_ms(*h200) == pytest.approx(engine.roofline_ms(*h200) - glue_ms)


def test_tiny_step_backward_writes_gradients_once():
    """No layout copies and no zero-filled gradients in the engine's backward: the attention's
    dq, dk, dv are packed into qkv's layout by ``tec_fast::qkv_heads_backward`` (with the bias
    gradient; the eager timm order stacks, then clones once more), the relation head's q, k are
    stacked straight into its output's layout, and the custom ops' statistics outputs get no
    materialised zero gradients."""
    engine = traffic.count_step("engine", "tiny", 4)
    eager = traffic.count_step("eager", "tiny", 4)
    ops = lambda c, phase: [r.op for r in c.records if r.phase == phase]  # noqa: E731
    assert "aten.clone" not in ops(engine, "backward")
    assert "aten.zeros" not in ops(engine, "backward")
    assert "aten.clone" in ops(eager, "backward")  # what the test would catch
    attention = ops(engine, "forward").count("aten._scaled_dot_product_flash_attention_for_cpu")
    assert ops(engine, "backward").count("tec_fast.qkv_heads_backward") == attention
    assert ops(engine, "backward").count("aten.stack") == 1  # the relation head's q, k


def test_cli_appends_estimate_rows(tmp_path):
    path = tmp_path / "traffic.jsonl"
    traffic.main(["--model", "tiny", "--batch", "2", "--results", str(path)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"engine", "eager"}
    for r in rows:
        assert r["label"] == "estimate" and r["bench"] == "traffic"
        for key in ("commit", "torch", "shape", "dtype", "gb_moved", "gflop", "launches", "peak_act_gb",
                    "est_ms_h100", "est_ms_h200", "floor_ms_h200", "top_ops_h200", "timestamp"):
            assert key in r, key
