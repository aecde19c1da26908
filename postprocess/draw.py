"""Pictures of what the model found: masks at 40% with a solid outline, solid boxes and filled label tags.

Sizes follow the image (its shorter side), so a 224-pixel thumbnail and a
4000-pixel photo both read well; each object's colour stands out against the pixels its outline crosses
(`colors.object_colors`). Tags are kept inside the image: above the box
when there is room, otherwise just inside its top edge, shifted left at the
right border, and the label shortened with "…" if it is wider than the image.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import cv2
import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from postprocess.colors import object_colors, text_color_on
from postprocess.parse import Object, Piece, objects

MASK_ALPHA = 0.4
PAGE_OPACITY = 0.85  # gr.AnnotatedImage shows its overlays at this CSS opacity
_FONT_FILE = "DejaVuSans.ttf"  # wide Unicode coverage; Pillow's built-in font when it is not installed


def line_width(width: int, height: int) -> int:
    """Box and outline width in pixels: 2 to 4, about 1.25% of the shorter side."""
    return min(4, max(2, round(min(width, height) / 80)))


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
    """A copy of `image` with each object's mask (if decoded), box and label tag drawn in its colour
    (`colors`: {label: colour}; by default `object_colors` of `image`)."""
    found = objects(pieces)
    colors = colors if colors is not None else colors_on(image, found)
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
    _draw_tags(pen, found, colors, width, height)
    return picture


def colors_on(image: Image.Image, found: Iterable[Object]) -> dict[str, str]:
    """{label: colour} of each object, picked for contrast against the pixels around its outline."""
    reach = 2 * line_width(*image.size)
    return object_colors(image, ((obj.label, obj.box) for obj in found), reach)


def draw_tags(image: Image.Image, pieces: Iterable[Piece], colors: Mapping[str, str]) -> Image.Image:
    """A copy of `image` with only the label tags drawn: the base picture of the page's overlays."""
    picture = image.convert("RGB")
    _draw_tags(ImageDraw.Draw(picture), objects(pieces), colors, *image.size)
    return picture


def _draw_tags(
    pen: ImageDraw.ImageDraw, found: list[Object], colors: Mapping[str, str], width: int, height: int
) -> None:
    font = _font(font_size(width, height))
    for obj in found:
        layout = label_tag_layout(obj.label, obj.box, width, height) if obj.label else None
        if layout is not None:
            text, (left, top, right, bottom) = layout
            color = colors[obj.label]
            pen.rectangle((left, top, right - 1, bottom - 1), fill=color, outline=text_color_on(color))
            pen.text(((left + right) / 2, (top + bottom) / 2), text, fill=text_color_on(color), font=font, anchor="mm")


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
    region[inside] = blended[inside]
    region[inside & ~_core(inside, stroke)] = rgb


def annotated_image_value(
    image: Image.Image, pieces: Iterable[Piece], colors: Mapping[str, str] | None = None, hidden: Iterable[str] = ()
) -> tuple[tuple, dict[str, str]]:
    """(the value `gr.AnnotatedImage` shows, its `color_map`), drawn as `draw_annotations` draws.

    The value is (image with the label tags, [(float alpha H×W in [0, 1], label)]): a box is its solid
    outline; a mask is filled so that it shows at MASK_ALPHA under the component's own opacity, with a solid
    outline. Objects in `hidden` keep their legend entry and show nothing. colors: {label: colour}, by default
    picked for contrast on `image` (`colors_on`); pass the same to `draw_annotations` for the download."""
    found = objects(pieces)
    colors = colors if colors is not None else colors_on(image, found)
    hidden = set(hidden)
    shown = [obj for obj in found if obj.label not in hidden]
    stroke = line_width(*image.size)
    annotations = []
    for obj in found:
        alpha = np.zeros((image.height, image.width), np.float32)
        if obj.label not in hidden:
            alpha = _mask_alpha(obj.mask, stroke) if obj.mask is not None else _box_alpha(alpha, obj.box, stroke)
        annotations.append((alpha, obj.label))
    return (draw_tags(image, shown, colors), annotations), colors


def _box_alpha(alpha: np.ndarray, box, stroke: int) -> np.ndarray:
    x1, y1, x2, y2 = (int(v) for v in box)
    alpha[y1:y2, x1:x2] = 1.0
    alpha[y1 + stroke : max(y1 + stroke, y2 - stroke), x1 + stroke : max(x1 + stroke, x2 - stroke)] = 0.0
    return alpha


def _mask_alpha(mask: np.ndarray, stroke: int) -> np.ndarray:
    alpha = np.where(mask, 1.0, 0.0).astype(np.float32)
    alpha[_core(mask, stroke)] = MASK_ALPHA / PAGE_OPACITY
    return alpha


def _core(mask: np.ndarray, stroke: int) -> np.ndarray:
    """bool [H, W]: the mask less its outline, `stroke` pixels wide (a mask touching the edge is outlined there)."""
    eroded = cv2.erode(
        mask.astype(np.uint8),
        np.ones((3, 3), np.uint8),
        iterations=stroke,
        borderType=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return eroded > 0


def highlighted_text_value(pieces: Iterable[Piece]) -> list[tuple[str, str | None]]:
    """The value `gr.HighlightedText` shows: plain text as is, each labelled object as its label in its colour."""
    return [
        (piece.label, piece.label) if isinstance(piece, Object) and piece.label else (piece.text, None)
        for piece in pieces
    ]
