"""The model's eye: the exact square image the model saw, its patch grid, and the boxes in its coordinates.

    picture = model_eye(image, text, model.config.image_size, model.config.vision.patch_size)
    note = squash_note(width, height, model.config.image_size)   # "640×480 squashed to 224×224: ..."

The model never sees the uploaded picture: paligemma.preprocess squashes it to a res×res square without
keeping its aspect ratio, and the vision encoder cuts that into patch×patch tiles. Drawing the boxes there
(from the same loc bins, mapped over the square) shows what a box means to the model, e.g. why a tall thin
object became a squat one. The square is enlarged by a whole factor with nearest-neighbour sampling, so every
model pixel stays one solid block and the grid lines fall between blocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw

from paligemma.preprocess import preprocess
from postprocess.draw import draw_annotations
from postprocess.parse import display_labels, parse

DISPLAY_SIDE = 448  # the square is enlarged to at least this many pixels, by a whole factor
GRID_COLOR = (255, 255, 255, 110)


def model_input(image, image_size: int) -> Image.Image:
    """The image_size×image_size RGB picture the model saw: paligemma.preprocess's values mapped back to uint8."""
    pixels = preprocess(image, image_size)  # float32 [S, S, 3] in [-1, 1]
    return Image.fromarray(np.round((pixels + 1.0) * 127.5).clip(0, 255).astype(np.uint8), "RGB")


def model_eye(
    image,
    text: str,
    image_size: int,
    patch_size: int,
    colors: Mapping[str, str] | None = None,
    display_side: int = DISPLAY_SIDE,
) -> Image.Image:
    """The model's input enlarged by a whole factor, with its patch grid and the objects of `text` drawn.

    colors: {display label ("cat", "cat 2", ...): colour}, e.g. the page's, so that an object looks the same in
    both pictures; by default picked for contrast on this view (draw_annotations)."""
    if patch_size < 1 or image_size < patch_size:
        raise ValueError(f"need 1 <= patch_size <= image_size, got patch {patch_size} and image {image_size}")
    factor = max(1, math.ceil(display_side / image_size))
    side = image_size * factor
    seen = model_input(image, image_size).resize((side, side), Image.Resampling.NEAREST)
    grid = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    pen = ImageDraw.Draw(grid)
    for offset in range(patch_size * factor, side, patch_size * factor):
        pen.line((offset, 0, offset, side - 1), fill=GRID_COLOR)
        pen.line((0, offset, side - 1, offset), fill=GRID_COLOR)
    seen = Image.alpha_composite(seen.convert("RGBA"), grid).convert("RGB")
    return draw_annotations(seen, display_labels(parse(text, side, side)), colors)


def squash_note(width: int, height: int, image_size: int, patch_size: int | None = None) -> str:
    """A sentence on how the width×height image became the model's square, and how much each axis changed."""
    sx, sy = image_size / width, image_size / height
    note = f"Your {width}×{height} image was resized to {image_size}×{image_size}"
    if abs(sx / sy - 1) < 0.01:
        note += f" (×{sx:.2f} both ways, aspect ratio kept)."
    else:
        wider = "wider" if sx > sy else "taller"
        note += (
            f": ×{sx:.2f} across and ×{sy:.2f} down, so things look {max(sx, sy) / min(sx, sy):.2f}× "
            f"{wider} to the model than to you."
        )
    if patch_size:
        cells = image_size // patch_size
        note += f" The grid shows its {cells}×{cells} patches of {patch_size}×{patch_size} pixels."
    return note
