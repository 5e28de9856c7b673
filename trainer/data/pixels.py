"""Pillow image modes -> the model's colour mode ("L" or "RGB"): the one rule for everyone.

The trainer decodes folder datasets with it and the service decodes uploads with it
(``service.imaging.convert_mode``), so a served model sees pixels converted exactly as the
ones it was trained on:

- transparency (LA, La, RGBA, RGBa, PA, P with a transparent colour) is composited on white;
- 16-bit (I;16*) and 32-bit integer (I) grayscale is scaled from 0..65535 to 0..255 (Pillow's
  own ``convert`` clips everything above 255 to white); float (F) images are scaled by 255
  when they lie in 0..1, else clipped to 0..255;
- CMYK, YCbCr, HSV, LAB and 1-bit go through Pillow's converters (LAB via RGB).

Raises ``ValueError`` for a mode Pillow cannot convert. Depends on Pillow and numpy only.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from PIL import Image

COLOR_MODES: Final = ("L", "RGB")
BACKGROUND: Final = (255, 255, 255, 255)  # transparent pixels become white

_ALPHA_MODES: Final = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
_WIDE_GRAY_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_color_mode(image: Image.Image, color_mode: str) -> Image.Image:
    """Any decoded image -> Pillow mode ``color_mode`` ("L" or "RGB"), transparency on white."""
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be 'L' or 'RGB', not {color_mode!r}")
    if image.mode in _WIDE_GRAY_MODES or image.mode == "F":
        image = _to_8bit_gray(image)
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "La":  # premultiplied: Pillow converts it only to LA
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES:
        white = Image.new("RGBA", image.size, BACKGROUND)
        image = Image.alpha_composite(white, image.convert("RGBA"))
    if image.mode == color_mode:
        return image
    try:
        return image.convert(color_mode)
    except ValueError:  # no direct converter (LAB -> L): go through RGB
        return image.convert("RGB").convert(color_mode)


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit int / float grayscale -> "L", scaling instead of clipping."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        scaled = np.clip(np.rint(values * scale), 0, 255)
    else:  # 0..65535 -> 0..255 with rounding (x / 257)
        wide = np.clip(values.astype(np.int64), 0, 65535)
        scaled = (wide * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8), mode="L")
