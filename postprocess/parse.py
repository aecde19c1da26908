"""PaliGemma's output text ⇄ ordered pieces: plain text and located objects.

An object is written `<locY1><locX1><locY2><locX2>`, optionally 16 `<segNNN>`
mask codes, then an optional label; objects are joined by " ; ". Each location
is a bin of 1024 over the image height (y) or width (x).

Bins and pixels, the two directions (exact inverses up to the rounding to a bin):
- decoding, as the published demos do: pixel = round(bin / 1024 * size);
- encoding: bin = round(pixel / size * 1024), clipped to 0..1023.
For a size of at least 1024 pixels, bin → pixel → bin gives the same bin back.

Sampled models emit broken objects too. `parse` never raises on them and never
drops them: a span that is not a well-formed object (fewer than four loc tokens,
a seg-token count other than 0 or 16, codes out of range, y2 <= y1 or x2 <= x1
in pixels) stays a `Text` piece, so the pieces always join back to the input.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np

from paligemma import NUM_LOC, NUM_SEG, SEG_TOKENS_PER_MASK

SEPARATOR = " ; "
UNLABELLED = "object"  # the display name of an object the model gave no label

_OBJECT_RE = re.compile(
    r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>"  # y1 x1 y2 x2
    r"\s*(?P<segs>(?:<seg\d{3}>){16})?"
    r"(?!\s*<seg)"  # any other number of seg tokens makes the span malformed
    r"(?P<label>[^;<>\n]*)"  # the label runs to a separator, a token or the line's end
    r"(?:;[ \t]*)?"
)
_SEG_CODE_RE = re.compile(r"<seg(\d{3})>")
_FORBIDDEN_IN_LABEL = re.compile(r"[;<>\n]")


@dataclasses.dataclass(frozen=True)
class Text:
    """Plain text of the output, or a span that did not form a valid object."""

    text: str


@dataclasses.dataclass(frozen=True)
class Object:
    """One located object.

    box: pixel (x1, y1, x2, y2), half-open like array slicing, x1 < x2 and y1 < y2.
    seg_codes: the 16 VQ-VAE codes (a 4×4 grid, row-major) or None for a box only.
    mask: bool[height, width] once decoded (see `MaskDecoder.attach_masks`).
    text: the exact span of the output this object came from.
    """

    label: str
    box: tuple[int, int, int, int]
    text: str
    seg_codes: tuple[int, ...] | None = None
    mask: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)


Piece = Text | Object


def bin_to_pixel(bin_index: int, size: int) -> int:
    """Decoding: the pixel coordinate of a location bin, as the published demos compute it."""
    return round(bin_index / NUM_LOC * size)


def pixel_to_bin(pixel: float, size: int) -> int:
    """Encoding: the location bin of a pixel coordinate; the inverse of `bin_to_pixel`."""
    return min(max(round(pixel / size * NUM_LOC), 0), NUM_LOC - 1)


def parse(text: str, width: int, height: int) -> list[Piece]:
    """The ordered pieces of a model output; `"".join(p.text for p in pieces) == text`.

    Objects keep the model's labels, as exported data should; `display_labels` names them for a page.
    """
    _check_size(width, height)
    pieces: list[Piece] = []
    position = 0
    for match in _OBJECT_RE.finditer(text):
        if match.start() > position:
            pieces.append(Text(text[position : match.start()]))
        pieces.append(_object_or_text(match, width, height))
        position = match.end()
    if position < len(text):
        pieces.append(Text(text[position:]))
    return _merge_adjacent_text(pieces)


def objects(pieces: Iterable[Piece]) -> list[Object]:
    """Only the objects among `pieces`, in order."""
    return [piece for piece in pieces if isinstance(piece, Object)]


def format_object(
    label: str,
    box: Sequence[float],
    width: int,
    height: int,
    seg_codes: Sequence[int] | None = None,
) -> str:
    """The text PaliGemma writes for one object: `<locY1><locX1><locY2><locX2>[16 <segNNN>] label`.

    box: pixel (x1, y1, x2, y2) inside the image. Bins follow `pixel_to_bin`, so
    `parse` gives the box back to within half a bin plus half a pixel.
    The label is stripped of surrounding spaces; an empty label writes no space.
    """
    _check_size(width, height)
    x1, y1, x2, y2 = _checked_box(box, width, height)
    label = label.strip()
    if _FORBIDDEN_IN_LABEL.search(label):
        raise ValueError(f"label {label!r} cannot be parsed back: it must not contain ';', '<', '>' or a newline")
    bins = (pixel_to_bin(y1, height), pixel_to_bin(x1, width), pixel_to_bin(y2, height), pixel_to_bin(x2, width))
    out = "".join(f"<loc{b:04d}>" for b in bins)
    if seg_codes is not None:
        out += "".join(f"<seg{code:03d}>" for code in _checked_seg_codes(seg_codes))
    return f"{out} {label}" if label else out


def join_objects(formatted: Iterable[str]) -> str:
    """Several `format_object` strings as one output, the way PaliGemma joins them."""
    return SEPARATOR.join(formatted)


def _object_or_text(match: re.Match, width: int, height: int) -> Piece:
    span = match.group(0)
    y1, x1, y2, x2 = (int(match.group(i)) for i in range(1, 5))
    codes = None
    if match.group("segs"):
        codes = tuple(int(code) for code in _SEG_CODE_RE.findall(match.group("segs")))
    box = (bin_to_pixel(x1, width), bin_to_pixel(y1, height), bin_to_pixel(x2, width), bin_to_pixel(y2, height))
    in_range = max(y1, x1, y2, x2) < NUM_LOC and (codes is None or max(codes) < NUM_SEG)
    if not in_range or box[2] <= box[0] or box[3] <= box[1]:
        return Text(span)
    return Object(label=match.group("label").strip(), box=box, text=span, seg_codes=codes)


def _merge_adjacent_text(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, Text) and merged and isinstance(merged[-1], Text):
            merged[-1] = Text(merged[-1].text + piece.text)
        else:
            merged.append(piece)
    return merged


def display_labels(pieces: Iterable[Piece]) -> list[Piece]:
    """The pieces with a readable, distinct name per object, for display only (a legend's keys, a picture's tags):
    an unlabelled object is "object", and repeats are numbered "cat", "cat 2", "cat 3", ..."""
    seen: set[str] = set()
    renamed: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, Object):
            base = piece.label or UNLABELLED
            label, count = base, 1
            while label in seen:
                count += 1
                label = f"{base} {count}"
            seen.add(label)
            piece = dataclasses.replace(piece, label=label)
        renamed.append(piece)
    return renamed


def _check_size(width: int, height: int) -> None:
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"image size must be positive whole pixels, got width={width!r}, height={height!r}")


def _checked_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"a box is 4 numbers (x1, y1, x2, y2) in pixels, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
        raise ValueError(
            f"box {tuple(box)} must satisfy 0 <= x1 <= x2 <= width={width} and 0 <= y1 <= y2 <= height={height}"
        )
    return x1, y1, x2, y2


def _checked_seg_codes(seg_codes: Sequence[int]) -> list[int]:
    codes = [int(code) for code in seg_codes]
    if len(codes) != SEG_TOKENS_PER_MASK or not all(0 <= code < NUM_SEG for code in codes):
        raise ValueError(
            f"seg_codes must be {SEG_TOKENS_PER_MASK} integers in 0..{NUM_SEG - 1}, got {list(seg_codes)!r}"
        )
    return codes
