"""Fast decode and the uint8 transforms: libjpeg-turbo (simplejpeg) gives PIL's pixels bit for
bit, DCT-scaled decodes match PIL's draft mode, the torch bicubic resample is bounded against a
float64 reference, and normalising on the device is bitwise what the workers used to do."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import smooth_image
from tec_fast.data.decode import EncodedImage, jpeg_reduction, to_rgb, turbo_decoder
from tec_fast.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, normalize, resized_crop, scale_box,
                                      train_crop)

needs_turbo = pytest.mark.skipif(turbo_decoder() is None, reason="simplejpeg is not installed")


def _jpeg(arr, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _pil_decode(data: bytes, reduce: int = 1) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if reduce > 1:
        img.draft("RGB", (img.width // reduce, img.height // reduce))
    return np.asarray(to_rgb(img))


RNG = np.random.default_rng(0)
JPEGS = {
    "ycbcr420": _jpeg(smooth_image(RNG, 67, 45), quality=90),
    "ycbcr444": _jpeg(smooth_image(RNG, 45, 67), quality=95, subsampling=0),
    "gray": _jpeg(smooth_image(RNG, 33, 50)[..., 0]),
}


@needs_turbo
@pytest.mark.parametrize("kind", sorted(JPEGS))
@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_turbo_decode_is_bitwise_pil(kind, reduce):
    data = JPEGS[kind]
    fast = EncodedImage(data)
    assert fast._turbo is not None and fast.plain_jpeg
    ref = _pil_decode(data, reduce)
    out = fast.decode(reduce)
    assert out.shape == ref.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(EncodedImage(data, use_turbo=False).decode(reduce), ref)


def test_cmyk_jpeg_and_png_take_pil():
    cmyk = io.BytesIO()
    Image.new("CMYK", (9, 7), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    img = EncodedImage(cmyk.getvalue())
    assert img._turbo is None and img.is_jpeg and not img.plain_jpeg
    np.testing.assert_array_equal(img.decode(2), _pil_decode(cmyk.getvalue(), 2))
    assert img.decode(1).shape == (7, 9, 3)
    png = io.BytesIO()
    Image.fromarray(smooth_image(RNG, 20, 10)).save(png, format="PNG")
    p = EncodedImage(png.getvalue())
    assert not p.is_jpeg and p.size == (20, 10)
    assert p.decode(4).shape == (10, 20, 3)  # reduction is for JPEGs only
    with pytest.raises(ValueError, match="reduce"):
        p.decode(3)


@pytest.mark.parametrize("use_turbo", [True, False])
def test_truncated_and_garbage_files_raise(use_turbo):
    data = JPEGS["ycbcr420"]
    with pytest.raises(Exception):
        EncodedImage(data[: len(data) // 2], use_turbo=use_turbo).decode()
    with pytest.raises(Exception):
        EncodedImage(b"not an image at all", use_turbo=use_turbo).decode()


def test_jpeg_reduction():
    assert jpeg_reduction(500, 375, 224, 224) == 1
    assert jpeg_reduction(1000, 800, 224, 224) == 2
    assert jpeg_reduction(4000, 3000, 300, 300) == 8
    assert jpeg_reduction(1000, 800, 224, 401) == 1  # both sides must keep enough pixels


# ------------------------------------------------------------------------------ resampling
def _bicubic(x):
    a, x = -0.5, abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 antialiased bicubic weights (support grows with the reduction),
    edge-clamped: the definition torch's and PIL's uint8 kernels implement."""
    scale = n_in / n_out
    fs = max(scale, 1.0)
    W = np.zeros((n_out, n_in))
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo, hi = max(int(center - 2 * fs + 0.5), 0), min(int(center + 2 * fs + 0.5), n_in)
        for i in range(lo, hi):
            W[o, i] = _bicubic((i - center + 0.5) / fs)
        W[o] /= W[o].sum()
    return W


@pytest.mark.parametrize("box, size", [((3, 5, 41, 37), 16), ((0, 0, 67, 45), 24), ((10, 2, 13, 11), 20)])
def test_resized_crop_bounded_against_float64(box, size):
    arr = smooth_image(np.random.default_rng(1), 67, 45)
    pixels = torch.from_numpy(arr).permute(2, 0, 1)
    out = resized_crop(pixels, box, size)
    assert out.shape == (3, size, size) and out.dtype == torch.uint8 and out.is_contiguous()
    left, top, w, h = box
    crop = arr[top:top + h, left:left + w].astype(np.float64)                     # [h, w, 3]
    ref = np.einsum("yh,hwc,xw->cyx", _weights(h, size), crop, _weights(w, size))  # [3, size, size]
    err = np.abs(out.numpy().astype(np.float64) - np.clip(ref, 0, 255))
    # two uint8 roundings (after each pass) in the kernel: at most ~1.1 grey levels
    assert err.max() <= 1.5 and err.mean() < 0.5, (err.max(), err.mean())


def test_scaled_decode_keeps_the_crop_geometry():
    """A crop decoded at 1/4 scale (DCT scaling) looks like the same crop from the full decode."""
    data = _jpeg(smooth_image(np.random.default_rng(2), 400, 320), quality=95)
    img = EncodedImage(data)
    box, size = (40, 24, 300, 260), 32
    full = resized_crop(torch.from_numpy(img.decode(1)).permute(2, 0, 1), box, size).float()
    small = img.decode(4)
    b4 = scale_box(box, 0.25, 0.25, small.shape[1], small.shape[0])
    reduced = resized_crop(torch.from_numpy(small.copy()).permute(2, 0, 1), b4, size).float()
    assert (full - reduced).abs().mean() < 4.0  # a shifted box would be off by far more on these gradients
    shifted = resized_crop(torch.from_numpy(small.copy()).permute(2, 0, 1), (b4[0] + 6, b4[1], b4[2], b4[3]), size)
    assert (full - shifted.float()).abs().mean() > 2 * (full - reduced).abs().mean()


def test_scale_box_covers_the_box_in_whole_pixels():
    """The scaled box grows to whole pixels (floor of its near edges, ceil of its far ones) and is
    clamped to the decoded image: a box that ends at the image's edge keeps the last pixel."""
    # 403 x 203 at 1/8: libjpeg decodes ceil(403/8) x ceil(203/8) = 51 x 26
    assert scale_box((0, 0, 403, 203), 1 / 8, 1 / 8, 51, 26) == (0, 0, 51, 26)
    assert scale_box((3, 5, 397, 190), 1 / 8, 1 / 8, 51, 26) == (0, 0, 50, 25)  # 400/8 = 50, 195/8 -> 25
    assert scale_box((8, 16, 8, 8), 1 / 8, 1 / 8, 51, 26) == (1, 2, 1, 1)  # one reduced pixel exactly


def test_train_crop_of_a_reduced_decode_matches_the_full_decode(monkeypatch):
    """A crop of a wide image decoded at 1/8 (its box clamped to the decoded width and height,
    not the other way round) looks like the same crop resampled from the full decode."""
    from tec_fast.data import transforms
    yy, xx = np.mgrid[0:203, 0:403].astype(np.float64)
    waves = [128 + 100 * np.sin(2 * np.pi * (xx / 500 + c / 3)) * np.cos(2 * np.pi * yy / 400) for c in range(3)]
    data = _jpeg(np.stack(waves, -1).round().astype(np.uint8), quality=95)  # smooth at 1/8 scale
    box = (103, 53, 300, 150)
    monkeypatch.setattr(transforms, "draw_train_crop", lambda w, h: (box, False))
    img = EncodedImage(data)
    assert jpeg_reduction(403, 203, 16 * 403 / 300, 16 * 203 / 150) == 8
    out = transforms.train_crop(img, 16).float()
    full = resized_crop(torch.from_numpy(img.decode(1)).permute(2, 0, 1), box, 16).float()
    assert (out - full).abs().mean() < 4.0  # the box grown to whole reduced pixels: a few levels


def test_train_crop_is_seeded_and_uint8():
    img = EncodedImage(JPEGS["ycbcr420"])
    torch.manual_seed(3)
    a = train_crop(img, 16)
    torch.manual_seed(3)
    b = train_crop(EncodedImage(JPEGS["ycbcr420"], use_turbo=False), 16)
    assert a.dtype == torch.uint8 and a.shape == (3, 16, 16)
    assert torch.equal(a, b)  # same pixels whichever decoder
    outputs = set()
    for s in range(12):
        torch.manual_seed(s)
        outputs.add(train_crop(img, 16).numpy().tobytes())
    assert len(outputs) == 12  # boxes and flips come from the seeded RNG


def test_normalize_is_bitwise_the_workers_float_path():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    ref = (x.float().div_(255.0) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(normalize(x), ref)
    assert torch.equal(normalize(x[0]), ref[0])
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.float())
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        normalize(torch.zeros(2, 4, 5, 5, dtype=torch.uint8))


def test_jpeg_with_libjpeg_warnings_decodes_as_pil_does():
    """libjpeg warns about stray bytes before a marker and decodes on; simplejpeg raises on the
    warning, so such a file takes PIL's decode instead of being counted as unreadable."""
    data = JPEGS["ycbcr420"]
    sos = data.rindex(b"\xff\xda")
    stray = data[:sos] + b"\x00\x00" + data[sos:]
    np.testing.assert_array_equal(EncodedImage(stray).decode(), _pil_decode(stray))
