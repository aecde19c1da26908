"""Ground truth for one image, pasted or uploaded, compared with the model's boxes and drawn for a person.

    truth = parse_ground_truth(text, width, height)        # list[Object], pixel boxes like parse()'s
    comparison = compare(objects(pieces), truth)            # matches with IoU, misses, false boxes, precision/recall
    picture = draw_comparison(image, objects(pieces), truth, comparison)   # with a legend below the image

Accepted forms of the ground truth (anything else is a ValueError saying what is accepted):
- PaliGemma suffix text: `<loc..><loc..><loc..><loc..> label ; ...`, optionally with 16 `<seg...>` per object;
- COCO-style JSON: a list of `{"bbox": [x, y, w, h], "category" or "label": name}` (one such object alone is
  fine too), or a COCO annotation file (`annotations` + `categories`, optionally `images`) from which the
  annotations of one image are taken: the only image, or the one whose `file_name` is `image_name`. Boxes are
  in that image's pixels; when its `width`/`height` differ from the shown image's they are scaled to it;
- the fine-tuning format: one JSONL line `{"image", "prefix", "suffix"}` (of several lines, the one whose
  `image` is `image_name`), whose suffix is read as above.

Matching (`compare`): one to one, only between boxes of the same label (compared without case or surrounding
spaces), and only at IoU >= MATCH_IOU; greedy by IoU, best pair first, or, given the predictions' scores, COCO's
rule: the most confident prediction first, each taking the unmatched true box it overlaps most.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from postprocess.draw import font_size, line_width
from postprocess.parse import UNLABELLED, Object, Text, format_object, objects, parse

MATCH_IOU = 0.5
STYLES = {  # the same colours as the evaluation report's matched predictions, misses and false boxes
    "match": "#1565c0",  # solid outline + "IoU 0.87" tag; the true box it matched is drawn thin
    "miss": "#ef6c00",  # dashed outline: a true box no prediction matched
    "false": "#c62828",  # solid outline over a translucent fill: a prediction that matched nothing
}
FALSE_FILL_ALPHA = 0.25
ACCEPTED = (
    "PaliGemma suffix text (<locNNNN> tokens and labels), COCO-style JSON boxes "
    '([{"bbox": [x, y, w, h], "category": "cat"}, ...] or a COCO annotation file), '
    'or one JSONL line of the fine-tuning format ({"image", "prefix", "suffix"})'
)


@dataclasses.dataclass(frozen=True)
class Match:
    predicted: int  # index into the predicted objects
    truth: int  # index into the true objects
    iou: float


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The outcome for one image; precision is None without predictions, recall None without true boxes."""

    matches: list[Match]
    misses: list[int]  # true objects no prediction matched
    false_boxes: list[int]  # predicted objects that matched no true object
    predicted_count: int
    truth_count: int

    @property
    def precision(self) -> float | None:
        return len(self.matches) / self.predicted_count if self.predicted_count else None

    @property
    def recall(self) -> float | None:
        return len(self.matches) / self.truth_count if self.truth_count else None

    def summary(self) -> str:
        """One line for a person, e.g. 'precision 0.50 (1 of 2 boxes right), recall 1.00 (1 of 1 found)'."""

        def share(value):
            return "—" if value is None else f"{value:.2f}"

        return (
            f"precision {share(self.precision)} ({len(self.matches)} of {self.predicted_count} boxes right), "
            f"recall {share(self.recall)} ({len(self.matches)} of {self.truth_count} found) "
            f"at IoU ≥ {MATCH_IOU}"
        )


def parse_ground_truth(text: str, width: int, height: int, image_name: str | None = None) -> list[Object]:
    """The true objects of one width×height image from any accepted form (see the module doc)."""
    stripped = text.strip() if isinstance(text, str) else ""
    if not stripped:
        raise ValueError(f"the ground truth is empty; accepted: {ACCEPTED}")
    if stripped[0] in "[{":
        return _from_json_text(stripped, width, height, image_name)
    if "<loc" in stripped:
        return _from_suffix(stripped, width, height)
    raise ValueError(
        f"could not read this ground truth: it holds no <locNNNN> tokens and is not JSON. Accepted: {ACCEPTED}"
    )


def compare(
    predicted: Sequence[Object],
    truth: Sequence[Object],
    threshold: float = MATCH_IOU,
    scores: Sequence[float] | None = None,
) -> Comparison:
    """One-to-one matching between boxes of the same label at IoU >= threshold: best pair first, or most
    confident prediction first when `scores` (one per prediction) are given (see the module doc)."""
    ious = box_ious([p.box for p in predicted], [t.box for t in truth])  # [P, T]
    same_label = np.array([[_label_key(p.label) == _label_key(t.label) for t in truth] for p in predicted], bool)
    candidates = np.where(same_label.reshape(ious.shape), ious, -1.0)
    matches = []
    while candidates.size and candidates.max() >= threshold:
        if scores is None:
            p, t = np.unravel_index(np.argmax(candidates), candidates.shape)
        else:
            open_rows = np.flatnonzero(candidates.max(axis=1) >= threshold)
            p = open_rows[np.argmax(np.asarray(scores, float)[open_rows])]
            t = np.argmax(candidates[p])
        matches.append(Match(int(p), int(t), float(ious[p, t])))
        candidates[p, :] = -1.0
        candidates[:, t] = -1.0
    matched_p, matched_t = {m.predicted for m in matches}, {m.truth for m in matches}
    return Comparison(
        matches=sorted(matches, key=lambda m: m.predicted),
        misses=[t for t in range(len(truth)) if t not in matched_t],
        false_boxes=[p for p in range(len(predicted)) if p not in matched_p],
        predicted_count=len(predicted),
        truth_count=len(truth),
    )


def box_ious(boxes_a: Sequence[Sequence[float]], boxes_b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of every box of a with every box of b, boxes (x1, y1, x2, y2): [len(a), len(b)]."""
    a = np.asarray(boxes_a, np.float64).reshape(-1, 4)[:, None]  # [A, 1, 4]
    b = np.asarray(boxes_b, np.float64).reshape(-1, 4)[None]  # [1, B, 4]
    overlap_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    overlap_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    overlap = overlap_w * overlap_h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - overlap
    return np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)


def draw_comparison(
    image: Image.Image, predicted: Sequence[Object], truth: Sequence[Object], comparison: Comparison
) -> Image.Image:
    """A copy of `image` with matches (solid, IoU tag), misses (dashed) and false boxes (filled), and a legend
    strip below it."""
    picture = image.convert("RGB")
    width, height = picture.size
    stroke = line_width(width, height)
    font = ImageFont.load_default(font_size(width, height))
    fill = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    fill_pen = ImageDraw.Draw(fill)
    for p in comparison.false_boxes:
        x1, y1, x2, y2 = predicted[p].box
        fill_pen.rectangle((x1, y1, x2 - 1, y2 - 1), fill=_rgba(STYLES["false"], FALSE_FILL_ALPHA))
    picture = Image.alpha_composite(picture.convert("RGBA"), fill).convert("RGB")
    pen = ImageDraw.Draw(picture)
    tags = []
    for m in comparison.matches:
        _rectangle(pen, truth[m.truth].box, STYLES["match"], 1)
        _rectangle(pen, predicted[m.predicted].box, STYLES["match"], stroke)
        tags.append((predicted[m.predicted].box, f"{_name(predicted[m.predicted])} IoU {m.iou:.2f}", STYLES["match"]))
    for t in comparison.misses:
        _dashed_rectangle(pen, truth[t].box, STYLES["miss"], stroke, dash=3 * stroke + 2)
        tags.append((truth[t].box, f"missed {_name(truth[t])}", STYLES["miss"]))
    for p in comparison.false_boxes:
        _rectangle(pen, predicted[p].box, STYLES["false"], stroke)
        tags.append((predicted[p].box, f"false {_name(predicted[p])}", STYLES["false"]))
    for box, text, color in tags:
        _draw_tag(pen, box, text, color, font, picture.size)
    return _with_legend(picture, font, stroke)


def _draw_tag(pen: ImageDraw.ImageDraw, box, text: str, color: str, font, size: tuple[int, int]) -> None:
    """White text on `color` above the box when there is room, else just inside its top; kept inside the image."""
    width, height = size
    pad = max(1, font.size // 5)
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(int(box[0]), 0), max(width - tag_w, 0))
    y = int(box[1]) - tag_h if box[1] >= tag_h else min(int(box[1]), max(height - tag_h, 0))
    pen.rectangle((x, y, x + tag_w - 1, y + tag_h - 1), fill=color)
    pen.text((x + pad - left, y + pad - top), text, fill="white", font=font)


def _with_legend(picture: Image.Image, font, stroke: int) -> Image.Image:
    """The picture over a legend of the three styles, its entries wrapped onto as many rows as its width needs
    (a 224-pixel picture holds two to a row)."""
    entries = (("match", "match (IoU)"), ("miss", "missed true box"), ("false", "false box"))
    row = font.size + 4 * stroke + 6
    swatch = (2 * font.size, row - 6)
    probe = ImageDraw.Draw(picture)
    widths = [swatch[0] + 4 + round(probe.textlength(name, font=font)) for _, name in entries]
    places, x, line = [], 4, 0  # each entry's (x, row number)
    for width in widths:
        if x > 4 and x + width > picture.width - 4:
            x, line = 4, line + 1
        places.append((x, line))
        x += width + 3 * font.size // 2
    out = Image.new("RGB", (picture.width, picture.height + row * (line + 1)), "white")
    out.paste(picture, (0, 0))
    pen = ImageDraw.Draw(out)
    for (style, name), (x, line) in zip(entries, places):
        top = picture.height + 3 + line * row
        box = (x, top, x + swatch[0], top + swatch[1])
        if style == "miss":
            _dashed_rectangle(pen, box, STYLES[style], stroke, dash=max(3, swatch[0] // 4))
        else:
            if style == "false":
                pen.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=_blend_on_white(STYLES[style]))
            _rectangle(pen, box, STYLES[style], stroke)
        pen.text((box[2] + 4, top + swatch[1] / 2), name, fill="black", font=font, anchor="lm")
    return out


def _rectangle(pen: ImageDraw.ImageDraw, box, color: str, width: int) -> None:
    x1, y1, x2, y2 = box
    pen.rectangle((x1, y1, x2 - 1, y2 - 1), outline=color, width=width)


def _dashed_rectangle(pen: ImageDraw.ImageDraw, box, color: str, width: int, dash: int) -> None:
    """The outline of the half-open box, `width` pixels thick inside it, as dashes of `dash` pixels with gaps as
    long, starting at each corner's side."""
    x1, y1, x2, y2 = (int(v) for v in box)
    width = max(1, min(width, (x2 - x1 + 1) // 2, (y2 - y1 + 1) // 2))
    for start in range(x1, x2, 2 * dash):
        end = min(start + dash, x2) - 1
        pen.rectangle((start, y1, end, y1 + width - 1), fill=color)
        pen.rectangle((start, y2 - width, end, y2 - 1), fill=color)
    for start in range(y1, y2, 2 * dash):
        end = min(start + dash, y2) - 1
        pen.rectangle((x1, start, x1 + width - 1, end), fill=color)
        pen.rectangle((x2 - width, start, x2 - 1, end), fill=color)


def _rgba(color: str, alpha: float) -> tuple[int, int, int, int]:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return r, g, b, round(255 * alpha)


def _blend_on_white(color: str) -> tuple[int, int, int]:
    r, g, b, a = _rgba(color, FALSE_FILL_ALPHA)
    return tuple(round(c * a / 255 + 255 * (1 - a / 255)) for c in (r, g, b))


def _name(obj: Object) -> str:
    return obj.label or UNLABELLED


def _label_key(label: str) -> str:
    return label.strip().casefold()


def _from_suffix(suffix: str, width: int, height: int) -> list[Object]:
    pieces = parse(suffix, width, height)
    for piece in pieces:
        if isinstance(piece, Text) and ("<loc" in piece.text or "<seg" in piece.text):
            raise ValueError(
                f"this part of the ground truth is not a well-formed object: {piece.text.strip()!r} "
                f"(an object is 4 <locNNNN> tokens y1 x1 y2 x2 with y1 < y2 and x1 < x2, optionally "
                f"16 <segNNN> tokens, then its label; objects are joined by ' ; ')"
            )
    return objects(pieces)


def _from_json_text(text: str, width: int, height: int, image_name: str | None) -> list[Object]:
    try:
        return _from_json(json.loads(text), width, height, image_name)
    except json.JSONDecodeError as err:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2 or err.msg != "Extra data":
            raise ValueError(f"the ground truth looks like JSON but does not parse: {err}") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"JSONL line {number} does not parse: {err}") from None
    record = _pick_for_image(
        records, lambda r: r.get("image") if isinstance(r, dict) else None, image_name, "JSONL lines"
    )
    return _from_json(record, width, height, image_name)


def _from_json(data, width: int, height: int, image_name: str | None) -> list[Object]:
    if isinstance(data, dict) and "suffix" in data:
        if not isinstance(data["suffix"], str):
            raise ValueError(f'the line\'s "suffix" must be text, got {type(data["suffix"]).__name__}')
        return _from_suffix(data["suffix"], width, height) if data["suffix"].strip() else []
    if isinstance(data, dict) and "annotations" in data:
        return _from_coco_file(data, width, height, image_name)
    if isinstance(data, dict) and "bbox" in data:
        data = [data]
    if isinstance(data, list):
        return [_from_annotation(a, i, {}, width, height, (1.0, 1.0)) for i, a in enumerate(data, 1)]
    raise ValueError(f"this JSON is not ground truth this page reads. Accepted: {ACCEPTED}")


def _from_coco_file(coco: dict, width: int, height: int, image_name: str | None) -> list[Object]:
    annotations, images = coco.get("annotations"), coco.get("images") or []
    if not isinstance(annotations, list) or not isinstance(images, list):
        raise ValueError('a COCO file\'s "annotations" and "images" must be lists')
    names = {c.get("id"): c.get("name") for c in coco.get("categories") or [] if isinstance(c, dict)}
    ids_annotated = sorted({a.get("image_id") for a in annotations if isinstance(a, dict)}, key=str)
    if images:
        image = _pick_for_image(
            images, lambda i: i.get("file_name") if isinstance(i, dict) else None, image_name, "images"
        )
        image_id = image.get("id")
        scale = (_scale(image.get("width"), width), _scale(image.get("height"), height))
    elif len(ids_annotated) <= 1:
        image_id, scale = (ids_annotated or [None])[0], (1.0, 1.0)
    else:
        raise ValueError(
            f'the annotations are of {len(ids_annotated)} images and the file has no "images" list to '
            f"tell which is this one; paste only this image's annotations"
        )
    mine = [a for a in annotations if isinstance(a, dict) and a.get("image_id") == image_id]
    return [_from_annotation(a, i, names, width, height, scale) for i, a in enumerate(mine, 1)]


def _scale(recorded, actual: int) -> float:
    """How much the file's image size (when it gives a usable one) must be scaled to reach the shown image's."""
    usable = isinstance(recorded, int | float) and not isinstance(recorded, bool) and recorded > 0
    return actual / recorded if usable else 1.0


def _pick_for_image(records: list, name_of, image_name: str | None, what: str):
    if len(records) == 1:
        return records[0]
    if image_name:
        wanted = os.path.basename(image_name)
        found = [r for r in records if isinstance(name_of(r), str) and os.path.basename(name_of(r)) == wanted]
        if len(found) == 1:
            return found[0]
    shown = f" (this image is {os.path.basename(image_name)!r})" if image_name else ""
    raise ValueError(
        f"the ground truth holds {len(records)} {what} and none is this image's alone{shown}; "
        f"paste the part that describes this image only"
    )


def _from_annotation(
    annotation, number: int, names: dict, width: int, height: int, scale: tuple[float, float]
) -> Object:
    where = f"annotation {number}"
    if not isinstance(annotation, dict) or "bbox" not in annotation:
        raise ValueError(f'{where} must be an object with "bbox": [x, y, w, h] and a "category" or "label"')
    bbox = annotation["bbox"]
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        raise ValueError(f"{where}: bbox must be 4 numbers [x, y, w, h] in pixels, got {bbox!r}")
    label = _label_of(annotation, names, where)
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: bbox {bbox} has no area (w and h must be positive)")
    x1, x2 = (min(max(round(v * scale[0]), 0), width) for v in (x, x + w))
    y1, y2 = (min(max(round(v * scale[1]), 0), height) for v in (y, y + h))
    x2, y2 = max(x2, min(x1 + 1, width)), max(y2, min(y1 + 1, height))  # a box under a pixel keeps one
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{where}: bbox {bbox} lies outside the {width}×{height} image")
    box = (x1, y1, x2, y2)
    return Object(label=label, box=box, text=format_object(label, box, width, height))


def _label_of(annotation: dict, names: dict, where: str) -> str:
    for key in ("category", "label", "category_name", "name"):
        if isinstance(annotation.get(key), str):
            label = annotation[key].strip()
            break
    else:
        if "category_id" not in annotation:
            raise ValueError(f'{where} has no label: give it a "category" or "label" name')
        if annotation["category_id"] not in names:
            raise ValueError(
                f'{where} has category_id {annotation["category_id"]!r}, which no entry of "categories" names'
            )
        label = str(names[annotation["category_id"]]).strip()
    if any(c in label for c in ";<>\n"):
        raise ValueError(f"{where}: label {label!r} must not contain ';', '<', '>' or a newline")
    return label
