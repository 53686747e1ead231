"""Every image mode PIL decodes, as 8-bit RGB with the mode's real range mapped to 0-255.

``Image.convert("RGB")`` is right for the 8-bit modes (1, L, P, PA, LA, RGBA, RGBX, CMYK,
YCbCr, LAB, HSV) but clips the wide ones: a 16-bit PNG (mode ``I;16``, values up to 65535)
would come out almost white. Those are scaled from their own range instead:

- ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N``: 0..65535.
- ``I`` (32-bit int; Pillow's mode for 16-bit TIFF / PGM data): 0..65535 when every value fits
  there, else the image's own min..max.
- ``F`` (32-bit float): the first of [0, 1], [0, 255], [0, 65535] that holds every value, else
  min..max; NaN and infinities count as 0.

Alpha is dropped, not composited: the colour channels are what the file stores and what the
released models' loaders (``convert("RGB")``) fed them.
"""
from __future__ import annotations

import numpy as np

WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img):
    """``img`` (any PIL mode) as a fully decoded RGB image."""
    from PIL import Image

    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in WIDE_INT_MODES or img.mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(img), img.mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "La":  # premultiplied alpha: un-premultiply first (PIL has no La -> RGB)
        img = img.convert("LA")
    return img.convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    if mode == "F":
        a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode in WIDE_INT_MODES:
        top = 65535.0
        lo = 0.0
    elif mode == "I" and lo >= 0 and hi <= 65535:
        lo, top = 0.0, 65535.0
    elif mode == "F" and lo >= 0 and hi <= 65535:
        top = 1.0 if hi <= 1 else 255.0 if hi <= 255 else 65535.0
        lo = 0.0
    else:  # values outside every nominal range: stretch the image's own range
        top = hi if hi > lo else lo + 1.0
    scaled = (a - lo) * (255.0 / (top - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------- encoded files
JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG colour spaces libjpeg-turbo turns into the same RGB as PIL's decode + ``to_rgb``
# (checked bitwise in tests/data/test_data_decode.py); CMYK / YCCK files take the PIL path.
_TURBO_COLORSPACES = ("YCbCr", "Gray")
_turbo = None


def turbo_decoder():
    """The ``simplejpeg`` module (libjpeg-turbo) when importable, else None."""
    global _turbo
    if _turbo is None:
        try:
            import simplejpeg
            _turbo = simplejpeg
        except ImportError:
            _turbo = False
    return _turbo or None


def decoder_name() -> str:
    """Which decoder a baseline JPEG takes in this process: ``simplejpeg`` or ``pil``."""
    return "simplejpeg" if turbo_decoder() is not None else "pil"


class EncodedImage:
    """An image file's bytes: ``width`` / ``height`` from the header, ``is_jpeg``, then one full
    decode to RGB (``decode``). Baseline JPEGs go through libjpeg-turbo (``simplejpeg``, when
    installed; same pixels as PIL, 1.4x faster here), every other file and mode through PIL
    and ``to_rgb``. ``use_turbo=False`` forces PIL. A file whose header or body cannot be read
    raises (OSError, ValueError, SyntaxError, ...; an empty one: ValueError "empty file").
    ``plain_jpeg``: a YCbCr or greyscale JPEG (what GPU decoders take)."""

    def __init__(self, data: bytes, use_turbo: bool = True):
        if not data:  # PIL would say "cannot identify image file <_io.BytesIO object at 0x...>"
            raise ValueError("empty file (0 bytes)")
        self.data, self.name = data, ""  # name: set by the dataset, for messages
        self.is_jpeg = data[:3] == JPEG_MAGIC
        self._pil = None
        turbo = turbo_decoder() if use_turbo and self.is_jpeg else None
        self._turbo = None
        if turbo is not None:
            try:
                h, w, colorspace, _ = turbo.decode_jpeg_header(data)
            except ValueError:  # a JPEG libjpeg-turbo's header reader refuses: PIL says why, or reads it
                colorspace = None
            if colorspace in _TURBO_COLORSPACES:
                self._turbo, self.width, self.height = turbo, int(w), int(h)
        if self._turbo is None:
            import io

            from PIL import Image, UnidentifiedImageError
            try:
                self._pil = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:  # its message names the BytesIO object, not the file
                raise UnidentifiedImageError(f"not an image format PIL reads ({len(data)} bytes starting "
                                             f"{data[:8]!r})") from None
            self.width, self.height = self._pil.size
        # a YCbCr or greyscale JPEG: what nvjpeg and libjpeg-turbo decode to the same RGB as PIL
        self.plain_jpeg = self._turbo is not None or (self.is_jpeg and self._pil.mode in ("RGB", "L"))

    @property
    def size(self):
        return self.width, self.height

    def decode(self, reduce: int = 1) -> np.ndarray:
        """[H', W', 3] uint8. ``reduce`` in (1, 2, 4, 8): a JPEG is decoded at 1/reduce of its size
        (``ceil(W / reduce)`` x ``ceil(H / reduce)``, libjpeg's DCT scaling: PIL's draft mode;
        the same pixels through either decoder); other formats ignore it."""
        if reduce not in (1, 2, 4, 8):
            raise ValueError(f"EncodedImage.decode: reduce must be 1, 2, 4 or 8, got {reduce!r}")
        if self._turbo is not None:
            try:
                if reduce == 1:
                    return self._turbo.decode_jpeg(self.data, colorspace="RGB")
                return self._turbo.decode_jpeg(self.data, colorspace="RGB", min_width=-(-self.width // reduce),
                                               min_height=-(-self.height // reduce))
            except ValueError:
                # simplejpeg raises on libjpeg's warnings too ("extraneous bytes before marker"),
                # which PIL decodes through: PIL has the last word on what is readable
                pass
        img, self._pil = self._pil, None  # PIL decodes an opened file once: a second decode reopens it
        if img is None:
            import io

            from PIL import Image
            img = Image.open(io.BytesIO(self.data))
        if reduce > 1 and img.format == "JPEG":
            img.draft("RGB", (self.width // reduce, self.height // reduce))
        return np.asarray(to_rgb(img))


def jpeg_reduction(width: int, height: int, need_w: float, need_h: float) -> int:
    """The largest of 8, 4, 2, 1 that keeps a ``width`` x ``height`` JPEG decoded at 1/factor at
    least ``need_w`` x ``need_h`` pixels."""
    for k in (8, 4, 2):
        if width // k >= need_w and height // k >= need_h:
            return k
    return 1
