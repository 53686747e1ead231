"""The packed encoder path (variable visible counts): packed == padded, variable and block masks."""
import pytest
import torch

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast.ops.attention import packed_attention
from tec_fast.masking import block_masking, variable_masking


def _models(seed=0):
    torch.manual_seed(seed)
    vit = ViTConfig(16, 4, 32, 3, 2)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3), topk=3)
    model = TECModel(TECConfig(encoder=vit, decoder_dim=16, decoder_depth=1, decoder_heads=2, tau=1.0,
                               pred_dim=24, pred_heads=3))
    return base, model


@pytest.mark.parametrize("backend,host_lengths", [("nested", False), ("nested", True), ("dense", False)])
def test_packed_attention_matches_per_image_sdpa(backend, host_lengths):
    torch.manual_seed(0)
    lens = [3, 1, 7, 5]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 2, 4, requires_grad=True) for _ in range(3))
    out = packed_attention(q, k, v, cu, max(lens), backend=backend, lengths=lens if host_lengths else None)
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref.append(torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)).transpose(0, 1))
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nested_backend_hands_the_true_length_bounds(monkeypatch):
    """The nested route tells SDPA the longest and shortest image (on CUDA its kernels size their
    work from them; on CPU they are ignored, so the values are checked where they are handed)."""
    lens = [3, 1, 7, 5]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 2, 4) for _ in range(3))
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q._max_seqlen, q._min_seqlen))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    packed_attention(q, k, v, cu, max(lens), backend="nested", lengths=lens)
    assert seen == [(7, 1)]


def test_packed_equals_padded_for_a_uniform_ratio():
    base, model = _models()
    x = torch.randn(3, 3, 16, 16)
    t = base(x)
    noise = torch.rand(3, 16)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dense = model(x1, t, 0.75, noise)
    packed = model(x2, t, torch.full((3,), 0.75), noise)  # a per-image ratio takes the packed path
    for key in dense:
        torch.testing.assert_close(dense[key], packed[key], rtol=1e-5, atol=1e-6)
    dense["loss"].backward()
    g_dense = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed["loss"].backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_dense[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_variable_ratios_match_per_image_dense_runs():
    base, model = _models(1)
    x = torch.randn(3, 3, 16, 16)
    t = base(x)
    noise = torch.rand(3, 16)
    ratios = [0.5, 0.75, 0.9]
    out = model(x, t, ratios, noise)
    # the feature loss is a ratio of sums over images: rebuild it from single-image dense runs
    keep, mask = variable_masking(3, 16, torch.tensor(ratios), noise=noise)
    num = 0.0
    for b, r in enumerate(ratios):
        tb = type(t)(*(v[b:b + 1] for v in t))
        single = model(x[b:b + 1], tb, r, noise[b:b + 1])
        num += single["feature"] * mask[b].sum()
        assert int(keep[b].sum()) == int(16 * (1 - r))
    torch.testing.assert_close(out["feature"], num / mask.sum(), rtol=1e-5, atol=1e-6)


def test_block_masks_train_through_the_packed_path():
    base, model = _models(2)
    x = torch.randn(4, 3, 16, 16)
    t = base(x)
    keep = block_masking(4, 4, 0.5, min_block=2, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (4, 16) and keep.any(1).all() and (~keep).any(1).all()
    out = model(x, t, keep=keep)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="keep"):
        model(x, t, keep=torch.ones(4, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep"):
        model(x, t, keep=keep.float())


def test_block_masking_ratio_on_average():
    keep = block_masking(64, 14, 0.4, generator=torch.Generator().manual_seed(1))
    ratio = 1 - keep.float().mean().item()
    assert 0.3 < ratio <= 0.4 + 1e-6


def test_block_masking_draws_blocks_of_the_recipe():
    """BEiT's blocks: aspect ratio log-uniform on [0.3, 1/0.3], so a block is as often taller
    than wide as wider than tall (a ratio drawn uniformly on that range is above 1 three times in
    four: masked patches then touch vertically 52% of the time, not 50%), and at least
    min_block patches large (a 4-patch block rounds to at least 3, so no masked region is
    smaller)."""
    keep = block_masking(2000, 14, 0.4, min_block=4, generator=torch.Generator().manual_seed(2))
    m = (~keep).view(-1, 14, 14)
    vertical, horizontal = (m[:, 1:] & m[:, :-1]).sum().item(), (m[:, :, 1:] & m[:, :, :-1]).sum().item()
    assert abs(vertical / (vertical + horizontal) - 0.5) < 0.008, (vertical, horizontal)
    keep = block_masking(200, 14, 0.4, min_block=4, generator=torch.Generator().manual_seed(3))
    for k in keep.view(-1, 14, 14):
        masked = (~k).tolist()
        seen = [[False] * 14 for _ in range(14)]
        for r0 in range(14):
            for c0 in range(14):
                if masked[r0][c0] and not seen[r0][c0]:  # one 4-connected masked region
                    stack, size = [(r0, c0)], 0
                    seen[r0][c0] = True
                    while stack:
                        r, c = stack.pop()
                        size += 1
                        for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                            if 0 <= rr < 14 and 0 <= cc < 14 and masked[rr][cc] and not seen[rr][cc]:
                                seen[rr][cc] = True
                                stack.append((rr, cc))
                    assert size >= 3, (size, k)


def test_variable_masking_errors():
    with pytest.raises(ValueError, match="one ratio per image"):
        variable_masking(3, 16, torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        variable_masking(2, 16, torch.tensor([0.5, 1.2]))


def test_packed_attention_checks_its_arguments():
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must be an int32"):
        packed_attention(q, q, q, cu.long(), 4)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=6"):
        packed_attention(q, q, q, torch.tensor([0, 2, 5], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=6"):  # a negative count
        packed_attention(q, q, q, torch.tensor([0, 7, 6], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"lengths \[4, 2\] differ from the counts cu_seqlens gives, \[2, 4\]"):
        packed_attention(q, q, q, cu, 4, lengths=[4, 2])
    with pytest.raises(ValueError, match=r"max_len must be an int in \[1, T=6\]"):
        packed_attention(q, q, q, cu, 0)
    with pytest.raises(ValueError, match="lengths must hold B=2 counts adding up to T=6"):
        packed_attention(q, q, q, cu, 4, lengths=[2, 3])


def test_varlen_dispatch_says_why_not():
    from tec_fast.ops.attention import packed_attention_backend, varlen_not_supported_reasons

    backend, why = packed_attention_backend(torch.device("cpu"), torch.bfloat16, 64)
    assert backend == "nested" and any("varlen: needs CUDA tensors" in r for r in why)
    reasons = varlen_not_supported_reasons(torch.device("cpu"), torch.float32, 12)
    assert any("fp16 / bf16" in r for r in reasons) and any("multiple of 8" in r for r in reasons)


def _meta_autocast(monkeypatch):
    """The meta device has no autocast state: the model's autocast calls on it act as on the CPU
    (where nothing is autocast here), so a step runs on meta tensors."""
    autocast, enabled = torch.autocast, torch.is_autocast_enabled
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k: autocast(
        "cpu" if device_type == "meta" else device_type, *a, **k))
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: enabled(*(["cpu"] if a and a[0] == "meta" else a)))


class _BlockingUploads:
    """Collects the host-to-device copies a step makes that wait for the device (on CUDA a
    ``torch.tensor(value, device=cuda)`` or ``.to(cuda)`` without ``non_blocking`` synchronises):
    ``torch.tensor`` / ``torch.as_tensor`` of host data with a device, and ``_to_copy`` / ``copy_``
    from the CPU to another device without ``non_blocking``."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.seen = []
        seen = self.seen
        for name in ("tensor", "as_tensor"):
            make = getattr(torch, name)

            def checked(data, *args, _make=make, _name=name, **kwargs):
                device = kwargs.get("device")
                if device is not None and torch.device(device).type != "cpu" and not isinstance(data, torch.Tensor):
                    seen.append(f"torch.{_name}(host data, device={device})")
                return _make(data, *args, **kwargs)

            monkeypatch.setattr(torch, name, checked)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.ops.aten._to_copy.default:
                    src, dst, blocking = args[0], kwargs.get("device"), not kwargs.get("non_blocking", False)
                elif func is torch.ops.aten.copy_.default:
                    dst, src = args[0].device, args[1]
                    blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
                else:
                    return func(*args, **kwargs)
                if (blocking and isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst is not None
                        and torch.device(dst).type != "cpu"):
                    seen.append(f"{func} from the CPU to {dst}, blocking")
                return func(*args, **kwargs)

        self.mode = Mode()


@pytest.fixture
def dense_attention(monkeypatch):
    """Packed attention forced to the materialised-mask backend: nested SDPA's CPU (math) route
    splits by lengths it reads back, the flash varlen kernel takes the host's ``max_len``."""
    from tec_fast.ops import attention

    monkeypatch.setenv("TEC_FAST_PACKED_ATTENTION", "dense")
    attention.reload_environment()
    yield
    monkeypatch.delenv("TEC_FAST_PACKED_ATTENTION")
    attention.reload_environment()


@pytest.mark.parametrize("masking", ["random", "block"])
def test_packed_training_step_reads_nothing_back(monkeypatch, dense_attention, masking):
    """The trainer's packed step (per-image ratios 0.6:0.9, or block masks) with every model
    tensor on the meta device, where a read back to the host fails: base targets, layout, encoder,
    adapter, decoders, losses and backward run, because the masks and visible counts come from
    the host's noise. The same step with the keep mask handed over on the device is refused."""
    from tec_fast.training.objectives import TECObjective

    _meta_autocast(monkeypatch)
    base, model = _models(3)
    base.to("meta")
    model.to("meta")
    objective = TECObjective(base, (0.6, 0.9), 16, masking=masking)
    assert objective.host_noise
    images = torch.randn(4, 3, 16, 16, device="meta")
    noise = torch.rand(4, objective.noise_columns)
    uploads = _BlockingUploads(monkeypatch)
    with uploads.mode:
        out = objective(model, (images, None), noise)
        out["loss"].backward()
    assert uploads.seen == []  # each would synchronise on CUDA
    assert out["loss"].device.type == "meta" and model.blocks[0].attn.qkv.weight.grad is not None
    keep, _ = variable_masking(4, 16, torch.tensor([0.6, 0.7, 0.8, 0.9]), noise=torch.rand(4, 16))
    with pytest.raises(NotImplementedError):  # counts of a device mask: read back
        model(images, base(images), keep=keep.to("meta"))


def test_host_keep_on_a_device_layout_has_the_host_layouts_indices():
    """with_keep: a host keep mask on a layout on another device (meta here, CUDA in training)
    builds its indices on the host and moves them; the host-known counts equal the on-host layout's."""
    from tec_fast.models.layout import TokenLayout

    keep, _ = variable_masking(3, 16, torch.tensor([0.5, 0.75, 0.9]), noise=torch.rand(3, 16))
    here = TokenLayout([(4, 4)] * 3).with_keep(keep)
    there = TokenLayout([(4, 4)] * 3, "meta").with_keep(keep)
    assert there.enc_lengths == here.enc_lengths == [1 + 8, 1 + 4, 1 + 1] and there.max_enc == here.max_enc == 9
    assert there.enc_index.device.type == there.cu_enc.device.type == there.mask.device.type == "meta"
    assert here.enc_index.tolist() == [i for i in range(3 * 17) if i % 17 == 0 or bool(keep.reshape(3, 16)[i // 17, i % 17 - 1])]
    assert here.cu_enc.tolist() == [0, 9, 14, 16] and here.cu_enc.dtype == torch.int32
    assert here.encoder_attention()["lengths"] == [9, 5, 2]


def test_objective_with_device_noise_equals_host_noise():
    """TECObjective reads a noise tensor that is not on the host back once: same loss."""
    from tec_fast.training.objectives import TECObjective

    base, model = _models(4)
    objective = TECObjective(base, (0.6, 0.9), 16)
    images, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 17)

    class Elsewhere(torch.Tensor):  # a stand-in for a device tensor: .cpu() is the read back
        pass
    reads = []
    far = noise.as_subclass(Elsewhere)
    Elsewhere.cpu = lambda self: reads.append(1) or self.as_subclass(torch.Tensor)
    a = objective(model, (images, None), noise)["loss"]
    b = objective(model, (images, None), far)["loss"]
    assert reads == [1] and torch.equal(a, b)


def test_objective_packed_step_equals_the_dense_step():
    """The trainer's packed route (host keep mask from the noise, packed encoder) with every
    image at ratio 0.75 gives the dense step's loss terms and gradients for the same noise."""
    from tec_fast.training.objectives import TECObjective

    base, model = _models(5)
    images, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 17)
    packed = TECObjective(base, (0.75, 0.75), 16)
    dense = TECObjective(base, 0.75, 16)
    assert packed.variable and not dense.variable
    out_p = packed(model, (images, None), noise)
    out_p["loss"].backward()
    g_p = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out_d = dense(model, (images, None), noise[:, :16])
    out_d["loss"].backward()
    for key in out_d:
        torch.testing.assert_close(out_p[key], out_d[key], rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_p[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_native_training_step_reads_nothing_back(monkeypatch, dense_attention):
    """Native resolution as the trainer runs it: the collate's per-image noise stays on the host
    when fit moves the batch (HostTensors), so the keep mask, the counts and the index tensors
    are made there, and the step runs on the meta device (where a read back fails)."""
    from tec_fast import TECConfig
    from tec_fast.models.native import NativeTECModel
    from tec_fast.training.loop import _to_device
    from tec_fast.training.objectives import HostTensors, NativeTECObjective

    _meta_autocast(monkeypatch)
    base, _ = _models(6)
    torch.manual_seed(6)
    model = NativeTECModel(TECConfig(encoder=ViTConfig(16, 4, 32, 3, 2), decoder_dim=16, decoder_depth=1,
                                     decoder_heads=2, tau=1.0, pred_dim=24, pred_heads=3))
    objective = NativeTECObjective(base, 0.75, 4, 1000)
    images = [torch.randn(3, 16, 16), torch.randn(3, 12, 20), torch.randn(3, 8, 16)]
    batch = objective.collate([(im, torch.rand(im.shape[1] // 4 * (im.shape[2] // 4))) for im in images])
    base.to("meta")
    model.to("meta")
    native, noise = _to_device(batch, torch.device("meta"))
    assert isinstance(noise, HostTensors) and all(n.device.type == "cpu" for n in noise)
    assert native.patches.device.type == "meta"
    uploads = _BlockingUploads(monkeypatch)
    with uploads.mode:
        out = objective(model, (native, noise), None)
        out["loss"].backward()
    assert uploads.seen == []  # each would synchronise on CUDA
    assert out["loss"].device.type == "meta"
