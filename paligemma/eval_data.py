"""Evaluation data sets read into (image, prompt, expected answer) examples, with every bad entry reported.

Two formats:
- JSONL in the fine-tuning format, one `{"image", "prefix", "suffix"}` object a line, image paths relative to
  the file's folder (or to `image_root`). Each line is one example.
- A COCO annotation file (`{"images", "annotations", "categories"}`), images relative to `image_root` (default:
  the file's folder). Each image gets one `detect <category name>` prompt per category present in it; the
  expected answer is its boxes of that category in PaliGemma's format (`format_object`: boxes pass through
  the 1024 location bins, the precision the model can write). Crowd annotations are left out; categories absent
  from an image are not asked, so boxes for absent things are not measured on COCO input. The "line" of a COCO
  example is the 1-based position of its image in `images`.

A malformed entry, a missing image or a file that is not an image never stops the run: it becomes a Problem
with its line number, and the example is skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from postprocess import format_object, join_objects

from .preprocess import ImageError, open_image


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt about one image: `line` (1-based, see the module doc), the image's path, prefix and suffix."""

    line: int
    image: str
    prefix: str
    suffix: str

    @property
    def task(self) -> str:
        """The prompt's first word: caption, detect, segment, answer, ocr, ..."""
        return self.prefix.split(maxsplit=1)[0] if self.prefix.strip() else ""


@dataclasses.dataclass(frozen=True)
class Problem:
    """An entry that was skipped, and why."""

    line: int
    reason: str

    def as_dict(self) -> dict:
        return {"line": self.line, "reason": self.reason}


def read_examples(
    data_path: str | os.PathLike, image_root: str | os.PathLike | None = None, confined: bool = False
) -> tuple[list[Example], list[Problem]]:
    """The examples of a JSONL or COCO file whose images open, and the problems of the others.

    confined: an image path that leads out of the image folder (absolute, '..', a link) is a problem too, so that
    an uploaded data set cannot show the server's own pictures.

    Raises ValueError only when the file itself cannot be read as either format.
    """
    data_path = os.fspath(data_path)
    if not os.path.isfile(data_path):
        raise ValueError(f"no data file at {data_path}: give a .jsonl (image, prefix, suffix) or a COCO .json file")
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(data_path))
    with open(data_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    coco = _as_coco(text) if not data_path.endswith(".jsonl") else None
    examples, problems = _coco_examples(coco, root) if coco is not None else _jsonl_examples(text, root)
    return _with_readable_images(examples, problems, os.path.realpath(root) if confined else None)


def _as_coco(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        return data
    return None


def _jsonl_examples(text: str, root: str) -> tuple[list[Example], list[Problem]]:
    examples, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            fields = [row["image"], row["prefix"], row["suffix"]]
            if not all(isinstance(field, str) for field in fields) or not fields[0] or not fields[1].strip():
                raise TypeError("image, prefix and suffix must be text, image and prefix not empty")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            problems.append(Problem(number, f"expected a JSON object with image, prefix and suffix ({err})"))
            continue
        examples.append(Example(number, os.path.join(root, fields[0]), fields[1], fields[2]))
    return examples, problems


def _coco_examples(coco: dict, root: str) -> tuple[list[Example], list[Problem]]:
    names = {c.get("id"): str(c.get("name", "")).strip() for c in coco.get("categories", []) if isinstance(c, dict)}
    by_image = collections.defaultdict(list)
    for ann in coco["annotations"]:
        if isinstance(ann, dict) and not ann.get("iscrowd"):
            by_image[ann.get("image_id")].append(ann)
    examples, problems = [], []
    for number, image in enumerate(coco["images"], 1):
        try:
            path = os.path.join(root, image["file_name"])
            width, height = int(image["width"]), int(image["height"])
            boxes = collections.defaultdict(list)  # category name -> [x1, y1, x2, y2] clipped to the image
            for ann in by_image.get(image["id"], []):
                x, y, w, h = (float(v) for v in ann["bbox"])
                boxes[names[ann["category_id"]]].append(
                    (max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height))
                )
            for name, found in sorted(boxes.items()):
                suffix = join_objects(format_object(name, box, width, height) for box in found)
                examples.append(Example(number, path, f"detect {name}", suffix))
        except (KeyError, TypeError, ValueError) as err:
            problems.append(Problem(number, f"a COCO image or one of its annotations is malformed ({err!r})"))
    return examples, problems


def _with_readable_images(
    examples: list[Example], problems: list[Problem], confined_to: str | None
) -> tuple[list[Example], list[Problem]]:
    """Opens each distinct image once (as an upload would be), keeping the examples whose image opens."""
    readable: dict[str, str | None] = {}  # path -> None, or why it cannot be used
    kept = []
    for example in examples:
        if example.image not in readable:
            readable[example.image] = _why_unreadable(example.image, confined_to)
        if readable[example.image] is None:
            kept.append(example)
        else:
            problems.append(Problem(example.line, readable[example.image]))
    return kept, sorted(problems, key=lambda p: p.line)


def _why_unreadable(path: str, confined_to: str | None) -> str | None:
    """None for an image that opens; else why not, naming an uploaded data set's image as the data set does
    (relative to its folder), never by where the server unpacked it."""
    shown = os.path.relpath(path, confined_to) if confined_to is not None else path
    if confined_to is not None and os.path.commonpath([confined_to, os.path.realpath(path)]) != confined_to:
        return f"image path leads out of the data set's folder: {shown}"
    if not os.path.isfile(path):
        return f"image not found: {shown}"
    try:
        open_image(path).close()
    except ImageError as err:
        return str(err)
    return None
