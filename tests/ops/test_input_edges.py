"""Input checks and dispatch decisions at their edges: a tensor of the wrong rank, an index of a
non-index dtype, a tensor on another device, a group count that does not match, images that do
not split into patches, each refused with a ValueError naming the argument; ``TEC_FAST_CHECKS``
off unless set; dispatch decisions cached per dtype, device, grad mode and op sizes (never a
stale one), forgetting them when new measured tables are loaded, a broken table leaving its GPU
class unmeasured, taking a Triton path measured exactly as fast as the reference, and a forced
Triton path naming every reason it cannot run."""
from __future__ import annotations

import json
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from tec_fast import ops
from tec_fast.ops import dispatch, validate


# ---- shapes, dtypes and devices of the arguments ---------------------------------------------

def test_a_tensor_of_higher_rank_is_refused_naming_it():
    ids = torch.tensor([[0, 2], [1, 3]])
    with pytest.raises(ValueError, match=r"^x must be 3-D, got shape \(2, 5, 3, 1\)$"):
        ops.masked_gather(torch.randn(2, 5, 3, 1), ids)
    with pytest.raises(ValueError, match=r"^pos must be 2-D, got shape \(5, 3, 1\)$"):
        ops.masked_gather(torch.randn(2, 5, 3), ids, torch.randn(5, 3, 1))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.bool])
def test_index_of_a_non_index_integer_dtype_is_refused(dtype):
    x = torch.randn(2, 5, 3)
    ids = torch.tensor([[0, 1], [1, 0]]).to(dtype)
    with pytest.raises(ValueError, match=rf"^ids_keep must be int64 or int32, got dtype {dtype}$"):
        ops.masked_gather(x, ids)


def test_index_of_int32_and_int64_is_taken():
    x = torch.randn(2, 5, 3)
    ids = torch.tensor([[0, 4], [3, 1]])
    assert torch.equal(ops.masked_gather(x, ids.int()), ops.masked_gather(x, ids))


def test_bias_on_another_device_is_refused_naming_it():
    x, w = torch.randn(2, 3, 8), torch.randn(24, 8)
    with pytest.raises(ValueError, match=r"^bias is on meta but the first input is on cpu$"):
        ops.qkv_heads(x, w, torch.zeros(24, device="meta"), 2)
    with pytest.raises(ValueError, match=r"^bias is on meta but the first input is on cpu$"):
        ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4), torch.zeros(4, device="meta"))


def test_patch_norm_mse_mask_on_another_device_is_refused_naming_it():
    pred, target = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"^mask is on meta but the first input is on cpu$"):
        ops.patch_norm_mse(pred, target, torch.ones(2, 5, device="meta"))


def _adapter_args(G=1, D=2, B=1, T=3, C=4, hidden=8):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    M = D // max(G, 1)
    return [r(D, B, T, C), r(D * C), r(D * C), [r(C, M * C) for _ in range(G)], [r(C) for _ in range(G)],
            [r(hidden, C) for _ in range(G)], [r(hidden) for _ in range(G)], [r(C, hidden) for _ in range(G)],
            [r(C) for _ in range(G)], r(C), r(C), 1e-5, 1e-5]


def test_encoder_adapter_without_groups_is_refused_naming_fuse_w():
    args = _adapter_args()
    for i in range(3, 9):
        args[i] = []
    with pytest.raises(ValueError, match=r"^fuse_w holds G=0 groups, which must divide the depth D=2 of feats"):
        ops.encoder_adapter(*args)


def test_encoder_adapter_group_lists_of_another_length_are_refused():
    args = _adapter_args(G=1)
    extra = _adapter_args(G=2, D=4)
    args[5] = args[5] + [extra[5][1]]  # fc1_w with 2 groups, fuse_w with 1
    with pytest.raises(ValueError, match=r"^fc1_w holds 2 groups, fuse_w holds 1$"):
        ops.encoder_adapter(*args)


def test_patch_embed_image_width_must_split_into_patches():
    w = torch.randn(4, 3, 4, 4)
    with pytest.raises(ValueError, match=r"^images of 8x10 pixels do not split into 4x4 patches$"):
        ops.patch_embed(torch.randn(1, 3, 8, 10), w)
    with pytest.raises(ValueError, match=r"^images of 10x8 pixels do not split into 4x4 patches$"):
        ops.patch_embed(torch.randn(1, 3, 10, 8), w)


def test_layer_norm_bias_of_another_width_is_refused_naming_it():
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"^bias must have shape \(16,\) for x \(2, 5, 16\), got torch.Size\(\[17\]\)$"):
        ops.layer_norm(x, torch.ones(16), torch.zeros(17))
    with pytest.raises(ValueError, match=r"^weight must have shape \(16,\) for x \(2, 5, 16\), got torch.Size\(\[8\]\)$"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(16))


# ---- TEC_FAST_CHECKS -------------------------------------------------------------------------

def test_exact_index_checks_on_cuda_are_off_unless_asked_for(monkeypatch):
    monkeypatch.delenv("TEC_FAST_CHECKS", raising=False)
    dispatch.reload_environment()
    assert validate.checks_forced() is False
    for value, forced in (("0", False), ("", False), ("1", True)):
        monkeypatch.setenv("TEC_FAST_CHECKS", value)
        dispatch.reload_environment()
        assert validate.checks_forced() is forced, value


# ---- dispatch: cached decisions --------------------------------------------------------------

@pytest.fixture
def fresh_dispatch():
    dispatch.reload_environment()
    yield
    dispatch.reload_environment()
    dispatch.load_tables()


def test_cached_decision_depends_on_the_dtype(triton_path):
    x = torch.randn(2, 3, 8)
    for first, second in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        dispatch.reload_environment()
        dispatch.set_kernel_mode("triton")
        assert ops.why_not_fast("layer_norm", x.to(first)) == ([] if first is torch.float32 else
                                                               [f"dtype {first} (the Triton kernels take float32, "
                                                                f"float16, bfloat16)"])
        reasons = ops.why_not_fast("layer_norm", x.to(second))
        assert (reasons == []) is (second is torch.float32), reasons


def test_cached_decision_depends_on_the_device(triton_path):
    x = torch.randn(2, 3, 8)
    assert ops.why_not_fast("layer_norm", x) == []
    (reason,) = ops.why_not_fast("layer_norm", torch.empty(2, 3, 8, device="meta"))
    assert reason.startswith("tensor on meta")


def test_cached_decision_depends_on_the_op_sizes(triton_path):
    q = torch.randn(1, 2, 200, 4)
    assert ops.why_not_fast("relation_targets", q, topk=2) == []
    assert ops.why_not_fast("relation_targets", q, topk=150) == ["1 + topk = 151 rows > 128"]
    assert ops.why_not_fast("relation_targets", q, topk=2) == []


def _fake_cuda_tensor():
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(2, 5, 8))


def _write_table(folder, op, fwd, fwdbwd):
    entry = lambda s, p: dict(speedup=s, shape="B=4", dtype="bf16", **{"pass": p})  # noqa: E731
    folder.mkdir(exist_ok=True)
    (folder / "TestGPU.json").write_text(json.dumps(dict(gpu_class="TestGPU", ops={
        op: {"fwd": entry(fwd, "fwd"), "fwdbwd": entry(fwdbwd, "fwdbwd")}})))
    dispatch.load_tables(str(folder))


@pytest.fixture
def on_test_gpu(fresh_dispatch):
    with mock.patch.object(dispatch, "_cuda_class", return_value="TestGPU"), \
            mock.patch.object(torch.cuda, "current_device", return_value=0):
        dispatch.set_kernel_mode("auto")
        yield


def test_cached_decision_depends_on_grad_mode(tmp_path, on_test_gpu):
    _write_table(tmp_path, "layer_norm", 2.0, 0.5)
    t = _fake_cuda_tensor()
    with torch.no_grad():
        assert ops.why_not_fast("layer_norm", t) == []
    with torch.enable_grad():
        (reason,) = ops.why_not_fast("layer_norm", t)
    assert reason == "measured 0.50x the reference on TestGPU (fwdbwd, B=4, bf16)"
    with torch.no_grad():
        assert dispatch.use_fast_path("layer_norm", t)


def test_loading_new_tables_forgets_cached_decisions(tmp_path, on_test_gpu):
    t = _fake_cuda_tensor()
    _write_table(tmp_path / "slow", "layer_norm", 0.5, 0.5)
    with torch.no_grad():
        assert ops.why_not_fast("layer_norm", t) == ["measured 0.50x the reference on TestGPU (fwd, B=4, bf16)"]
        _write_table(tmp_path / "fast", "layer_norm", 2.0, 2.0)
        assert ops.why_not_fast("layer_norm", t) == []


def test_a_triton_path_measured_exactly_as_fast_is_taken(tmp_path, fresh_dispatch):
    """MIN_SPEEDUP is the least speedup auto takes: a measured ratio equal to it is taken."""
    _write_table(tmp_path, "layer_norm", dispatch.MIN_SPEEDUP, dispatch.MIN_SPEEDUP)
    dispatch.set_kernel_mode("auto")
    for backward in (False, True):
        assert dispatch.dispatch_report("cuda", gpu="TestGPU", backward=backward)["layer_norm"] == ("triton", [])


def test_forced_triton_path_names_every_reason(fresh_dispatch):
    dispatch.set_kernel_mode("triton")
    dispatch._SETTINGS["interpret"] = False  # a CPU tensor without the interpreter
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"layer_norm cannot run its Triton kernels on this input "
                                           r"\(cpu torch.float64 \(2, 5, 8\)\): tensor on cpu and TRITON_INTERPRET "
                                           r"is not set; dtype torch.float64 \(the Triton kernels take"):
        ops.layer_norm(x, torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))


def test_a_broken_measured_table_leaves_its_class_unmeasured(tmp_path, fresh_dispatch):
    (tmp_path / "A.json").write_text("{not json")
    (tmp_path / "B.json").write_text(json.dumps(dict(ops={})))  # no gpu_class
    (tmp_path / "C.json").write_text(json.dumps(dict(gpu_class="TestGPU", ops={})))
    assert set(dispatch.load_tables(str(tmp_path))) == {"TestGPU"}
    dispatch.set_kernel_mode("auto")
    (reason,) = dispatch.dispatch_report("cuda", gpu="B")["layer_norm"][1]
    assert reason.startswith("B is unmeasured")


# ---- dtypes that must agree -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["reference", "triton"])
def test_q_and_k_of_another_dtype_are_refused_naming_k(path, request):
    """The reference raised torch's own 'expected scalar type' error, naming nothing; the Triton
    path returned a float32 result for a float64 k."""
    if path == "triton":
        request.getfixturevalue("triton_path")
    q = torch.randn(2, 2, 6, 4)
    match = r"^k has dtype torch.float64 but q has torch.float32 \(q and k of one attention share one dtype\)$"
    with pytest.raises(ValueError, match=match):
        ops.relation_targets(q, q.double(), 2, 0.5)
    idx = torch.tensor([[0, 3], [4, 1]])
    with pytest.raises(ValueError, match=match):
        ops.relation_loss(q, q.double(), idx, torch.randn(2, 3, 2, 5), 1.8, 0.5)
    with pytest.raises(ValueError, match=match.replace("float64", "bfloat16")):
        ops.relation_loss(q, q.bfloat16(), idx, torch.randn(2, 3, 2, 5), 1.8, 0.5)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_patch_norm_mse_float64_needs_both_pred_and_target(path, request):
    """float64 is computed in float64 only when pred and target both are: the reference returned
    float64 and the Triton path float32 for one float64 tensor beside an fp32 one."""
    if path == "triton":
        request.getfixturevalue("triton_path")
    pred, mask = torch.randn(2, 5, 3), torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"^target has dtype torch.float64 but pred has torch.float32: the loss "
                                         r"is computed in float64 when both are float64"):
        ops.patch_norm_mse(pred, pred.double(), mask)
    with pytest.raises(ValueError, match=r"^target has dtype torch.float32 but pred has torch.float64"):
        ops.patch_norm_mse(pred.double(), pred, mask)
    # a 16-bit prediction against an fp32 target (the trainer's bf16 case) is computed in fp32
    assert ops.patch_norm_mse(pred.bfloat16(), pred, mask).dtype is torch.float32
    if path == "reference":  # (the Triton kernels take no float64)
        assert ops.patch_norm_mse(pred.double(), pred.double(), mask).dtype is torch.float64


def test_patch_norm_mse_refuses_a_complex_mask():
    pred = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"^mask must be real \(bool, integer or floating point; 1 = removed "
                                         r"patch\), got dtype torch.complex64$"):
        ops.patch_norm_mse(pred, pred, torch.ones(2, 5, dtype=torch.complex64))


def test_kernel_mode_argument_takes_any_case_as_the_variable_does(fresh_dispatch):
    dispatch.set_kernel_mode(" Reference ")
    assert dispatch.kernel_mode() == "reference"
    with pytest.raises(ValueError, match=r"^kernel mode must be one of \('auto', 'triton', 'reference'\), got 'cuda'$"):
        dispatch.set_kernel_mode("CUDA")
