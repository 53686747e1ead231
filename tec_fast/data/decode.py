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
