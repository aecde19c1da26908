"""One colour per label, shared by the drawn image and the UI's highlighted text.

The colour is picked from a fixed palette by a stable hash (CRC-32) of the label's
UTF-8 bytes, so a label keeps its colour across requests, images and processes
(Python's own `hash` of a str changes per process). Two labels may share a colour
when their hashes meet; their tags still tell them apart.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from PIL import ImageColor

# Sasha Trubetskoy's "20 simple, distinct colours" without the white-ish and grey ones.
PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990", "#dcbeff",
    "#9a6324", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075",
)  # fmt: skip


def label_color(label: str) -> str:
    """The "#rrggbb" colour of one label."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def label_colors(labels: Iterable[str]) -> dict[str, str]:
    """{label: "#rrggbb"} for each distinct label, e.g. for `gr.HighlightedText(color_map=...)`."""
    return {label: label_color(label) for label in labels}


def text_color_on(color: str) -> str:
    """Black or white, whichever reads better on a background of `color` (by luminance)."""
    r, g, b = ImageColor.getrgb(color)[:3]
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"
