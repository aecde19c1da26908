"""Pictures of what the model found: translucent masks, boxes and label tags.

Sizes follow the image (its shorter side), so a 224-pixel thumbnail and a
4000-pixel photo both read well. Tags are kept inside the image: above the box
when there is room, otherwise just inside its top edge, shifted left at the
right border, and the label shortened with "…" if it is wider than the image.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import cv2
import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from postprocess.colors import label_colors, text_color_on
from postprocess.parse import Object, Piece, objects

MASK_ALPHA = 0.45
_FONT_FILE = "DejaVuSans.ttf"  # wide Unicode coverage; Pillow's built-in font when it is not installed


def line_width(width: int, height: int) -> int:
    """Box and outline width in pixels: about 0.3% of the shorter side, at least 1."""
    return max(1, round(min(width, height) / 320))


def font_size(width: int, height: int) -> int:
    """Label text height in pixels: about 2.5% of the shorter side, at least 10."""
    return max(10, round(min(width, height) / 40))


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype(_FONT_FILE, size)
    except OSError:
        return ImageFont.load_default(size)


def label_tag_layout(
    label: str, box: tuple[int, int, int, int], width: int, height: int
) -> tuple[str, tuple[int, int, int, int]] | None:
    """(text to write, tag rectangle x1, y1, x2, y2 half-open) inside the image, or None if no tag fits."""
    font = _font(font_size(width, height))
    pad = max(2, font.size // 4)
    tag_height = font.size + 2 * pad
    if tag_height > height:
        return None
    text = _shortened_to_fit(label, font, width - 2 * pad)
    if text is None:
        return None
    tag_width = round(font.getlength(text)) + 2 * pad
    x1, y1 = box[0], box[1]
    left = min(max(x1, 0), width - tag_width)
    top = y1 - tag_height if y1 >= tag_height else min(y1, height - tag_height)
    return text, (left, top, left + tag_width, top + tag_height)


def _shortened_to_fit(label: str, font, room: int) -> str | None:
    text = label
    while font.getlength(text) > room:
        if len(text) <= 1:
            return None
        text = text[: len(text) - 2] + "…"
    return text


def draw_annotations(
    image: Image.Image, pieces: Iterable[Piece], colors: Mapping[str, str] | None = None
) -> Image.Image:
    """A copy of `image` with each object's mask (if decoded), box and label tag drawn in its label's colour."""
    found = objects(pieces)
    colors = colors if colors is not None else label_colors(obj.label for obj in found)
    width, height = image.size
    stroke = line_width(width, height)
    canvas = np.array(image.convert("RGB"))
    for obj in found:
        if obj.mask is not None:
            _fill_mask(canvas, obj.mask, ImageColor.getrgb(colors[obj.label]), stroke)
    picture = Image.fromarray(canvas)
    pen = ImageDraw.Draw(picture)
    for obj in found:
        x1, y1, x2, y2 = obj.box
        pen.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colors[obj.label], width=stroke)
    for obj in found:
        layout = label_tag_layout(obj.label, obj.box, width, height) if obj.label else None
        if layout is not None:
            text, (left, top, right, bottom) = layout
            color = colors[obj.label]
            pen.rectangle((left, top, right - 1, bottom - 1), fill=color)
            pen.text(
                ((left + right) / 2, (top + bottom) / 2),
                text,
                fill=text_color_on(color),
                font=_font(font_size(width, height)),
                anchor="mm",
            )
    return picture


def _fill_mask(canvas: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int], stroke: int) -> None:
    """Blends `rgb` into the masked pixels and paints their inner border solid; pixels outside stay untouched."""
    if mask.shape != canvas.shape[:2]:
        raise ValueError(f"a mask must be the image's size {canvas.shape[:2]}, got {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return
    window = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # work on the mask's bounding box only
    region, inside = canvas[window], mask[window]
    blended = cv2.addWeighted(region, 1 - MASK_ALPHA, np.full_like(region, rgb), MASK_ALPHA, 0)
    core = cv2.erode(
        inside.astype(np.uint8),
        np.ones((3, 3), np.uint8),
        iterations=stroke,
        borderType=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    region[inside] = blended[inside]
    region[inside & (core == 0)] = rgb


def annotated_image_value(image: Image.Image, pieces: Iterable[Piece]) -> tuple:
    """The value `gr.AnnotatedImage` shows: (image, [(float mask H×W in [0, 1] or box (x1, y1, x2, y2), label)]).

    The component takes its colours from its own `color_map=`; give it `label_colors(...)`
    of the same labels so that it matches the drawn image and the highlighted text.
    """
    annotations = []
    for obj in objects(pieces):
        region = obj.mask.astype(np.float32) if obj.mask is not None else tuple(int(v) for v in obj.box)
        annotations.append((region, obj.label))
    return image, annotations


def highlighted_text_value(pieces: Iterable[Piece]) -> list[tuple[str, str | None]]:
    """The value `gr.HighlightedText` shows: plain text as is, each labelled object as its label in its colour."""
    return [
        (piece.label, piece.label) if isinstance(piece, Object) and piece.label else (piece.text, None)
        for piece in pieces
    ]
