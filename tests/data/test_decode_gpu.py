"""--decode gpu. On the CPU: what the workers send (the encoded JPEG with the box and flip the CPU
path would draw; other files cropped on the CPU), the batch's crop / flip / normalisation with a
stand-in decoder, fallbacks, and the one-line error where the GPU path is unavailable. With CUDA
and torchvision: nvjpeg's images against the CPU path, and a short training run."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from data_helpers import write_folder
from tec_fast.data import gpu_decode
from tec_fast.data.decode import EncodedImage
from tec_fast.data.folder import ImageFolderDataset
from tec_fast.data.gpu_decode import (EncodedBatch, EncodedSample, GpuDecodeView, collate_encoded,
                                      gpu_decode_reasons)
from tec_fast.data.transforms import draw_train_crop, normalize


def _has_gpu_decode() -> bool:
    return torch.cuda.is_available() and not gpu_decode_reasons("cuda")


needs_gpu_decode = pytest.mark.skipif(not _has_gpu_decode(), reason="needs CUDA and torchvision with nvjpeg")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("gpu"), n=10, size=(48, 36), png_every=4, seed=5)


def _is_png(ds, i):
    return ds.names[i].endswith(".png")


def test_workers_send_files_with_the_cpu_paths_box(folder):
    ds = ImageFolderDataset(folder, img_size=16, train=True, uint8=True)
    view = GpuDecodeView(ds)
    for i in range(len(ds)):
        torch.manual_seed(i)
        item, label = view[i]
        torch.manual_seed(i)
        cpu, cpu_label = ds[i]
        assert label == cpu_label
        if _is_png(ds, i):
            assert torch.equal(item, cpu)  # not a JPEG: cropped on the CPU, sent as uint8
            continue
        assert isinstance(item, EncodedSample) and item.data.dtype == torch.uint8
        with open(ds.names[i], "rb") as f:
            assert bytes(item.data.numpy()) == f.read()
        torch.manual_seed(i)
        assert (item.box, item.flip) == draw_train_crop(*EncodedImage(bytes(item.data.numpy())).size)


def _cpu_stand_in(device, files, names):
    """The GPU decoder's contract on the CPU: [3, H, W] uint8 per file."""
    return [torch.from_numpy(EncodedImage(bytes(f.numpy())).decode().copy()).permute(2, 0, 1) for f in files]


def _same_draws(ds, seed):
    """Each sample through the GPU-decode view and through the CPU path with the same seed, so
    both draw the same crop box and flip: (encoded samples, CPU uint8 images)."""
    view = GpuDecodeView(ds)
    samples, refs = [], []
    for i in range(len(ds)):
        torch.manual_seed(seed + i)
        samples.append(view[i])
        torch.manual_seed(seed + i)
        refs.append(ds[i][0])
    return samples, refs


def test_batch_crop_flip_normalise_match_the_cpu_path(folder, monkeypatch):
    """At 24 px no crop of these 48x36 images allows the CPU path's DCT-scaled decode, so both
    paths resample the same full-size pixels."""
    monkeypatch.setattr(gpu_decode, "_decode_on", _cpu_stand_in)
    ds = ImageFolderDataset(folder, img_size=24, train=True, uint8=True)
    samples, refs = _same_draws(ds, seed=100)
    batch, labels = collate_encoded(samples, 24)
    assert len(batch) == len(ds) and labels.tolist() == ds.targets
    out = batch.to("cpu")
    ref = normalize(torch.stack(refs))
    assert out.shape == ref.shape == (len(ds), 3, 24, 24) and out.dtype == torch.float32
    levels = (out - ref) * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255  # in grey levels
    # float resampling vs the CPU path's two uint8 roundings
    assert levels.abs().max() <= 1.6 and levels.abs().mean() < 0.5


def test_bad_jpegs_skipped_counted_and_stood_in(folder, tmp_path, monkeypatch):
    import shutil
    root = tmp_path / "d"
    shutil.copytree(folder, root)
    victim = sorted(root.glob("cat/*.jpg"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # no end marker: caught in the worker
    ds = ImageFolderDataset(str(root), img_size=16, train=True, uint8=True)
    view = GpuDecodeView(ds)
    with pytest.warns(RuntimeWarning, match=victim.name):
        view[ds.names.index(str(victim))]
    assert ds.num_skipped == 1

    def refuse_one(device, files, names):
        out = _cpu_stand_in(device, files, names)
        out[0] = None  # what _decode_on returns when neither nvjpeg nor PIL decodes a file
        return out

    monkeypatch.setattr(gpu_decode, "_decode_on", refuse_one)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch, _ = collate_encoded([view[i] for i in range(4)], 16)
    out = batch.to("cpu")
    first_good = next(i for i in range(1, 4) if isinstance(batch.items[i], EncodedSample))
    assert out.shape == (4, 3, 16, 16) and torch.equal(out[0], out[first_good])


def test_decode_waits_for_the_callers_stream(monkeypatch):
    """nvjpeg decodes from its own stream into memory the caching allocator may have freed under
    kernels still queued on the caller's: ``_decode_on`` synchronises the current stream first."""
    import sys
    import types

    calls = []
    io = types.ModuleType("torchvision.io")
    io.ImageReadMode = types.SimpleNamespace(RGB="RGB")
    io.decode_jpeg = lambda files, mode, device: calls.append("decode") or [torch.zeros(3, 2, 2, dtype=torch.uint8)
                                                                             for _ in files]
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", io)
    stream = types.SimpleNamespace(synchronize=lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    out = gpu_decode._decode_on(torch.device("cuda", 0), [torch.zeros(4, dtype=torch.uint8)] * 2, ["a.jpg", "b.jpg"])
    assert len(out) == 2 and calls == ["synchronize", "decode"]


def test_refusals_and_reasons(folder, capsys):
    reasons = gpu_decode_reasons("cpu")
    assert any("not a CUDA GPU" in r for r in reasons)
    with pytest.raises(ValueError, match="train mode"):
        GpuDecodeView(ImageFolderDataset(folder, img_size=16, train=False))
    assert EncodedBatch([], 16).__len__() == 0
    if _has_gpu_decode():
        return
    from tec_fast.cli.train import main
    with pytest.raises(SystemExit) as info:
        main(["--objective", "mae", "--data", folder, "--decode", "gpu", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: argument --decode: gpu is not available")


# -------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@needs_gpu_decode
def test_nvjpeg_batch_close_to_the_cpu_path(folder):
    ds = ImageFolderDataset(folder, img_size=24, train=True, uint8=True)  # 24 px: no DCT-scaled CPU decode
    samples, refs = _same_draws(ds, seed=7)
    batch, _ = collate_encoded(samples, 24)
    out = batch.pin_memory().to("cuda").cpu()
    levels = ((out - normalize(torch.stack(refs))) * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255).abs()
    # nvjpeg's IDCT / upsampling is not libjpeg-turbo's: a few grey levels apart at most on these images
    assert levels.mean() < 1.5 and torch.quantile(levels.flatten(), 0.99) < 8, (levels.mean(), levels.max())


@pytest.mark.gpu
@needs_gpu_decode
def test_training_with_gpu_decode(folder, tmp_path):
    from tec_fast.cli.train import main
    argv = ["--objective", "mae", "--model", "vit_demo_patch4", "--img-size", "32", "--data", folder,
            "--decode", "gpu", "--max-steps", "2", "--batch-size", "4", "--num-workers", "1",
            "--warmup-epochs", "0", "--output", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    assert os.path.isfile(tmp_path / "run" / "checkpoint-last.pth")
