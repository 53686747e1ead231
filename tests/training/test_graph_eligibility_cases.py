"""Which runs fit records into CUDA graphs and what the summary says otherwise, judged on CPU:
FSDP2 only counts with several processes, only torch's fused AdamW records, every reason in the
way is named, only fp16 scales its loss; the torchrun set-up's rank, local rank and device, and
its DDP wrapping."""
import pytest
import torch

from tec_fast.training import FitConfig
from tec_fast.training.graphed import graph_reasons, plan_graphs

CPU, CUDA, FUSED = torch.device("cpu"), torch.device("cuda"), "torch.optim.AdamW (fused)"


def test_fsdp_stands_in_the_way_only_under_several_processes():
    cfg = FitConfig(shard="fsdp", precision="bf16")  # in one process fit wraps nothing
    assert graph_reasons(cfg, CUDA, 1, FUSED, False) == []
    assert plan_graphs(cfg, CUDA, 1, FUSED, False) == (True, "")
    reasons = graph_reasons(cfg, CUDA, 2, FUSED, False)
    assert len(reasons) == 1 and "FSDP2" in reasons[0]


def test_only_the_fused_adamw_records():
    reasons = graph_reasons(FitConfig(), CUDA, 1, "torch.optim.AdamW (foreach)", False)
    assert reasons == ["it needs torch's fused AdamW (this run has torch.optim.AdamW (foreach))"]
    assert graph_reasons(FitConfig(), CUDA, 1, FUSED, False) == []


def test_fp16_stands_in_the_way_and_bf16_does_not():
    """fp16's loss scaler skips steps from the host; bf16 and fp32 need no scaler."""
    assert graph_reasons(FitConfig(precision="bf16"), CUDA, 1, FUSED, False) == []
    assert graph_reasons(FitConfig(precision="fp32"), CUDA, 1, FUSED, False) == []
    reasons = graph_reasons(FitConfig(precision="fp16"), CUDA, 1, FUSED, False)
    assert len(reasons) == 1 and reasons[0].startswith("fp16's loss scaler")


def test_only_fp16_runs_scale_the_loss():
    from tec_fast.training import DistInfo
    from tec_fast.training.loop import _precision

    for precision, scaled, dtype in (("fp16", True, torch.float16), ("bf16", False, torch.bfloat16),
                                     ("fp32", False, None)):
        scaler, amp_dtype = _precision(FitConfig(precision=precision), DistInfo())
        assert scaler.is_enabled() is scaled and amp_dtype == dtype, precision


def test_summary_names_every_reason():
    cfg = FitConfig(precision="fp16", compile=True)
    reasons = graph_reasons(cfg, CPU, 1, FUSED, True)
    assert len(reasons) == 4
    use, why = plan_graphs(cfg, CPU, 1, FUSED, True)
    assert not use and why == "eager: " + "; ".join(reasons)
    for words in ("CUDA device", "fp16", "fixed size", "compile"):
        assert words in why
    with pytest.raises(ValueError) as info:
        plan_graphs(FitConfig(precision="fp16", compile=True, cuda_graph="on"), CPU, 1, FUSED, True)
    assert str(info.value) == "cuda_graph: cannot record this run's step: " + "; ".join(reasons)


# ---- torchrun set-up ---------------------------------------------------------------------------
@pytest.fixture
def fresh_dist(monkeypatch):
    import tec_fast.training.distributed as distributed

    monkeypatch.setattr(distributed, "_DIST", None)  # undone after the test
    return distributed


def test_device_follows_the_local_rank(fresh_dist, monkeypatch):
    """On the second node of a 2 x 4 run (RANK 5, LOCAL_RANK 1) the process drives cuda:1."""
    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "1")  # no process group: only the device choice is judged
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    d = fresh_dist.setup_distributed()
    assert d.device == torch.device("cuda:1") and chosen == [torch.device("cuda:1")]
    assert (d.rank, d.local_rank, d.world) == (5, 1, 1)


def test_only_global_rank_zero_is_main():
    from tec_fast.training import DistInfo

    assert DistInfo(rank=0, world=8, local_rank=0).is_main
    assert not DistInfo(rank=4, world=8, local_rank=0).is_main  # first process of the second node
    assert not DistInfo(rank=1, world=8, local_rank=1).is_main
    assert not DistInfo().enabled and DistInfo(world=2).enabled


def test_only_the_main_process_locks_the_output_folder(fresh_dist, monkeypatch, tmp_path):
    from tec_fast.training import DistInfo

    locked, cleaned = [], []

    class _Lock:
        def __init__(self, output):
            locked.append(output)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(fresh_dist, "hold_output_lock", _Lock)
    monkeypatch.setattr(fresh_dist, "cleanup_distributed", lambda barrier=False: cleaned.append(barrier))
    for rank, lock, expected in ((1, True, []), (0, True, [str(tmp_path)]), (0, False, [])):
        locked.clear()
        monkeypatch.setattr(fresh_dist, "setup_distributed", lambda device=None, r=rank: DistInfo(rank=r, world=2))
        with fresh_dist.distributed_command("cpu", str(tmp_path), lock=lock) as d:
            assert d.rank == rank
        assert locked == expected, (rank, lock)
    assert cleaned == [True, True, True]


def test_ddp_of_a_recorded_run_has_a_static_graph(tmp_path):
    """fit's DDP wrapper is built with static_graph when the steps will be recorded (a gloo group
    of one process stands in for torchrun)."""
    import torch.distributed as dist

    from tec_fast.training import DistInfo
    from tec_fast.training.distributed import _wrap_model

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        d = DistInfo(rank=0, world=2)  # enabled: fit wraps as under torchrun
        for static in (True, False):
            wrapped, sync = _wrap_model(torch.nn.Linear(3, 2), FitConfig(), d, static_graph=static)
            assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and sync is wrapped
            assert wrapped.static_graph is static
    finally:
        dist.destroy_process_group()
