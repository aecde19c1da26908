"""Objects as JSON for download, and in the COCO results format for scoring.

Masks travel as COCO run-length encoding (pycocotools), with `counts` as an ASCII
string so that the JSON is plain text; `mask_from_rle` reads it back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from postprocess.confidence import ObjectConfidence
from postprocess.parse import Piece, objects

UNSCORED = 1.0  # the COCO score of an object whose token probabilities were not recorded


def mask_to_rle(mask: np.ndarray) -> dict:
    """bool[H, W] → {"size": [H, W], "counts": str} (COCO compressed RLE)."""
    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_from_rle(rle: Mapping) -> np.ndarray:
    """The inverse of `mask_to_rle`: bool[H, W]."""
    return coco_mask.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}).astype(bool)


def to_json(
    pieces: Iterable[Piece], width: int, height: int, confidences: Sequence[ObjectConfidence] | None = None
) -> dict:
    """{"width", "height", "objects": [{"label", "box" (pixels x1, y1, x2, y2), "box_normalized"
    (the same over width/height, in [0, 1]), "mask" (bool), "segmentation" (RLE or null)}]}.

    With `confidences` (postprocess.object_confidences, one per object) each object also gets its "score" and
    "confidence" (box, label and mask scores, and the top bins of each box edge)."""
    found = objects(pieces)
    _check_aligned(found, confidences)
    out = []
    for i, obj in enumerate(found):
        x1, y1, x2, y2 = obj.box
        entry = {
            "label": obj.label,
            "box": [x1, y1, x2, y2],
            "box_normalized": [x1 / width, y1 / height, x2 / width, y2 / height],
            "mask": obj.mask is not None,
            "segmentation": mask_to_rle(obj.mask) if obj.mask is not None else None,
        }
        if confidences is not None:
            entry["score"] = confidences[i].score
            entry["confidence"] = confidences[i].as_dict()
        out.append(entry)
    return {"width": width, "height": height, "objects": out}


def _check_aligned(found: list, confidences: Sequence[ObjectConfidence] | None) -> None:
    if confidences is not None and len(confidences) != len(found):
        raise ValueError(f"{len(confidences)} confidences for {len(found)} objects: give one per object, in order")


def to_coco_results(
    batch: Iterable[tuple[int, Iterable[Piece]] | tuple[int, Iterable[Piece], Sequence[ObjectConfidence]]],
    category_ids: Mapping[str, int] | None = None,
) -> list[dict]:
    """COCO results ({"image_id", "category_id", "bbox" [x, y, w, h], "score"[, "segmentation"]}) for
    (image_id, pieces) or (image_id, pieces, confidences) tuples, ready for `COCO.loadRes`. The score is each
    object's confidence (postprocess.object_confidences) when given, else UNSCORED.

    category_ids: label → COCO category id. Objects whose label is not in it are left
    out: a sampled model may name things the dataset has no category for. Without it,
    labels get ids 1, 2, ... in order of first appearance.
    """
    ids = dict(category_ids) if category_ids is not None else {}
    results = []
    for image_id, pieces, *scored in batch:
        found = objects(pieces)
        confidences = scored[0] if scored else None
        _check_aligned(found, confidences)
        for i, obj in enumerate(found):
            if category_ids is None:
                ids.setdefault(obj.label, len(ids) + 1)
            if obj.label not in ids:
                continue
            x1, y1, x2, y2 = obj.box
            result = {
                "image_id": image_id,
                "category_id": ids[obj.label],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": UNSCORED if confidences is None else confidences[i].score,
            }
            if obj.mask is not None:
                result["segmentation"] = mask_to_rle(obj.mask)
            results.append(result)
    return results
