"""Colours for what the model found: a fixed high-contrast palette, one colour per object on the picture.

Each label has a home colour from the palette, picked by a stable hash (CRC-32) of its UTF-8 bytes, so a
label keeps its colour across requests and processes. On a picture, an object keeps its home colour when that
stands out against the pixels its outline crosses; otherwise it gets the palette colour that stands out most.
That way a box never has the colour of the thing it frames (a blue box on a blue square). Contrast is WCAG's
luminance ratio (1 to 21; 3 is the usual floor for graphics).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageColor

# Saturated hues of different lightness, plus black and white: any region has one colour of contrast >= 4.5.
PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#000075", "#9a6324", "#800000",
    "#ffffff", "#000000",
)  # fmt: skip
MIN_CONTRAST = 3.0
_WORST_SHARE = 10  # contrast is judged on the 10th percentile of the pixels: a few matching pixels are fine


def label_color(label: str) -> str:
    """The "#rrggbb" home colour of one label."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def label_colors(labels: Iterable[str]) -> dict[str, str]:
    """{label: home colour} for each distinct label, e.g. for `gr.HighlightedText(color_map=...)`."""
    return {label: label_color(label) for label in labels}


def text_color_on(color: str) -> str:
    """Black or white, whichever contrasts more with a background of `color`."""
    rgb = ImageColor.getrgb(color)[:3]
    return "#000000" if contrast_ratio(rgb, (0, 0, 0)) >= contrast_ratio(rgb, (255, 255, 255)) else "#ffffff"


def luminance(rgb) -> np.ndarray:
    """WCAG relative luminance of sRGB values [..., 3] in 0..255."""
    c = np.asarray(rgb, np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])


def contrast_ratio(a, b) -> np.ndarray:
    """WCAG contrast ratio between sRGB colours (broadcasting over leading axes)."""
    la, lb = luminance(a), luminance(b)
    return (np.maximum(la, lb) + 0.05) / (np.minimum(la, lb) + 0.05)


def outline_color(preferred: str, pixels: np.ndarray) -> str:
    """`preferred` if it stands out against `pixels` [N, 3] (uint8), else the palette colour that stands out most."""
    if len(pixels) == 0:
        return preferred

    def worst(color: str) -> float:
        return float(np.percentile(contrast_ratio(pixels, ImageColor.getrgb(color)[:3]), _WORST_SHARE))

    if worst(preferred) >= MIN_CONTRAST:
        return preferred
    return max(PALETTE, key=worst)


def edge_pixels(canvas: np.ndarray, box: Sequence[int], reach: int) -> np.ndarray:
    """The pixels [N, 3] within `reach` pixels of the edge of `box` (x1, y1, x2, y2), inside and out: what an
    outline drawn there must stand out against."""
    height, width = canvas.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in box)
    outer = np.zeros((height, width), bool)
    outer[max(0, y1 - reach) : y2 + reach, max(0, x1 - reach) : x2 + reach] = True
    outer[max(0, y1 + reach) : max(0, y2 - reach), max(0, x1 + reach) : max(0, x2 - reach)] = False
    return canvas[outer][:, :3]


def object_colors(image: Image.Image, boxes: Iterable[tuple[str, Sequence[int]]], reach: int) -> dict[str, str]:
    """{display label: colour} for (display label, box) pairs on `image`, each picked by `outline_color`."""
    canvas = np.asarray(image.convert("RGB"))
    return {label: outline_color(label_color(label), edge_pixels(canvas, box, reach)) for label, box in boxes}
