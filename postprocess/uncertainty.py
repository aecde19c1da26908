"""Box-edge uncertainty: where the model hesitated to put each edge of a box, drawn as bands on the image.

    overlay = edge_band_overlay(width, height, boxes, edges)      # RGBA, transparent away from the bands
    picture = draw_edge_bands(image, boxes, edges)                 # the image with the overlay composited

Each edge of a box is a loc token; its top-k alternatives give a distribution over bins (see
postprocess.confidence.EdgeBins). For each bin the band holds a strip at that bin's pixel position
(`bin_to_pixel`, as parse() maps bins), across the box's extent along the edge, with opacity proportional to
the bin's probability: a sure edge is one dark line on the box, an unsure one a wide, faint smear. Strips are
at least one pixel thick, so at 224 pixels (about 4.6 bins a pixel) neighbouring bins share a row, which shows
the most probable of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageColor

from postprocess.confidence import EDGES  # y1, x1, y2, x2: the order of a box's loc tokens and of its edges here
from postprocess.parse import bin_to_pixel

BAND_COLOR = "#00e5ff"
MAX_ALPHA = 0.85  # opacity of a bin that holds all the probability


def edge_band_overlay(
    width: int,
    height: int,
    boxes: Sequence[Sequence[float]],
    edges: Sequence[Sequence],
    colors: Sequence[str] | None = None,
) -> Image.Image:
    """RGBA width×height: for each pixel box (x1, y1, x2, y2) its four edges' bands.

    edges: per box, four records in the order y1, x1, y2, x2, each with `bins` and `probs` (attributes, as
    confidence.EdgeBins, or keys, as its as_dict()): the bins and their probabilities in [0, 1].
    colors: one "#rrggbb" per box (default BAND_COLOR for all).
    """
    if len(edges) != len(boxes) or (colors is not None and len(colors) != len(boxes)):
        raise ValueError(
            f"need the edges (and colours, if given) of each box: {len(boxes)} boxes, "
            f"{len(edges)} edge lists, {'no' if colors is None else len(colors)} colours"
        )
    rgba = np.zeros((height, width, 4), np.float64)  # straight (not premultiplied) colour and alpha in [0, 1]
    for number, (box, box_edges) in enumerate(zip(boxes, edges)):
        color = np.asarray(ImageColor.getrgb(colors[number] if colors else BAND_COLOR)[:3], np.float64) / 255
        alpha = _box_band_alpha(width, height, box, box_edges, number)
        # "over": this box's band on top of the bands drawn so far
        out_alpha = alpha + rgba[..., 3] * (1 - alpha)
        blended = color * alpha[..., None] + rgba[..., :3] * (rgba[..., 3] * (1 - alpha))[..., None]
        rgba[..., :3] = np.divide(
            blended, out_alpha[..., None], out=np.zeros_like(blended), where=out_alpha[..., None] > 0
        )
        rgba[..., 3] = out_alpha
    return Image.fromarray(np.round(rgba * 255).astype(np.uint8), "RGBA")


def draw_edge_bands(
    image: Image.Image, boxes: Sequence[Sequence[float]], edges: Sequence[Sequence], colors: Sequence[str] | None = None
) -> Image.Image:
    """An RGB copy of `image` with the bands of `edge_band_overlay` drawn over it."""
    overlay = edge_band_overlay(image.width, image.height, boxes, edges, colors)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def _box_band_alpha(width: int, height: int, box: Sequence[float], box_edges: Sequence, number: int) -> np.ndarray:
    """[height, width] opacity of one box's bands: per pixel the largest of the strips covering it."""
    if len(box) != 4 or len(box_edges) != 4:
        raise ValueError(
            f"box {number + 1}: need a box (x1, y1, x2, y2) and its 4 edges {EDGES}, got "
            f"{len(box)} numbers and {len(box_edges)} edges"
        )
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    alpha = np.zeros((height, width), np.float64)
    for name, edge in zip(EDGES, box_edges):
        bins, probs = _bins_and_probs(edge)
        across = height if name[0] == "y" else width
        for bin_index, prob in zip(bins, probs):
            if not 0 <= prob <= 1 or not bin_index >= 0:
                raise ValueError(
                    f"box {number + 1}, edge {name}: bins must be >= 0 and probabilities in [0, 1], "
                    f"got bin {bin_index} with {prob}"
                )
            start = min(bin_to_pixel(bin_index, across), across - 1)
            end = max(bin_to_pixel(bin_index + 1, across), start + 1)
            strip = np.s_[start:end, x1:x2] if name[0] == "y" else np.s_[y1:y2, start:end]
            np.maximum(alpha[strip], prob * MAX_ALPHA, out=alpha[strip])
    return alpha


def _bins_and_probs(edge) -> tuple[list[int], list[float]]:
    if isinstance(edge, Mapping):
        bins, probs = edge["bins"], edge["probs"]
    else:
        bins, probs = edge.bins, edge.probs
    if len(bins) != len(probs):
        raise ValueError(f"an edge needs one probability per bin, got {len(bins)} bins and {len(probs)} probabilities")
    return [int(b) for b in bins], [float(p) for p in probs]
