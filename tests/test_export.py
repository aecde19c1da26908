"""JSON export and COCO results: RLE round trips, and pycocotools scores our output."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from postprocess.export import mask_from_rle, mask_to_rle, to_coco_results, to_json
from postprocess.parse import Object, Text

W, H = 64, 48


def _rect_mask(x1, y1, x2, y2):
    mask = np.zeros((H, W), bool)
    mask[y1:y2, x1:x2] = True
    return mask


@pytest.mark.parametrize(
    "mask",
    [
        np.random.default_rng(0).random((H, W)) > 0.5,
        np.zeros((H, W), bool),
        np.ones((H, W), bool),
        _rect_mask(3, 4, 40, 30),
        np.ascontiguousarray(_rect_mask(0, 0, 1, 48).T),  # a different shape, C order
    ],
    ids=["noise", "empty", "full", "rectangle", "tall"],
)
def test_rle_round_trips(mask):
    rle = mask_to_rle(mask)
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    back = mask_from_rle(json.loads(json.dumps(rle)))
    assert back.dtype == bool
    np.testing.assert_array_equal(back, mask)


def test_to_json():
    mask = _rect_mask(10, 10, 30, 20)
    pieces = [
        Text("found "),
        Object("car", (10, 10, 30, 20), "", mask=mask),
        Text(" and "),
        Object("", (0, 24, 64, 48), ""),
    ]

    out = json.loads(json.dumps(to_json(pieces, W, H)))

    assert (out["width"], out["height"]) == (W, H)
    car, unlabelled = out["objects"]
    assert car["label"] == "car" and car["box"] == [10, 10, 30, 20] and car["mask"] is True
    assert car["box_normalized"] == pytest.approx([10 / 64, 10 / 48, 30 / 64, 20 / 48])
    np.testing.assert_array_equal(mask_from_rle(car["segmentation"]), mask)
    assert unlabelled == {
        "label": "",
        "box": [0, 24, 64, 48],
        "box_normalized": [0, 0.5, 1, 1],
        "mask": False,
        "segmentation": None,
    }


def _ground_truth(images):
    """A COCO ground truth with one image per entry of `images` ([(category_id, mask)])."""
    annotations = []
    for image_id, objects in enumerate(images, start=1):
        for category_id, mask in objects:
            ys, xs = np.nonzero(mask)
            box = [int(xs.min()), int(ys.min()), int(xs.max() + 1 - xs.min()), int(ys.max() + 1 - ys.min())]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
                 "area": int(mask.sum()), "bbox": box, "segmentation": mask_to_rle(mask)}
            )  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": W, "height": H} for i in range(1, len(images) + 1)],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _average_precision(coco, results, kind):
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(results), kind)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats[0]


def test_coco_results_score_perfectly_against_the_same_objects():
    cat, dog, cat2 = _rect_mask(2, 2, 20, 30), _rect_mask(30, 10, 60, 40), _rect_mask(5, 5, 50, 45)
    coco = _ground_truth([[(1, cat), (2, dog)], [(1, cat2)]])
    batch = [
        (1, [Object("cat", (2, 2, 20, 30), "", mask=cat), Text(" ; "), Object("dog", (30, 10, 60, 40), "", mask=dog)]),
        (
            2,
            [
                Object("cat", (5, 5, 50, 45), "", mask=cat2),
                Object("unicorn", (0, 0, 9, 9), "", mask=_rect_mask(0, 0, 9, 9)),
            ],
        ),
    ]

    results = to_coco_results(batch, category_ids={"cat": 1, "dog": 2})

    assert [(r["image_id"], r["category_id"]) for r in results] == [(1, 1), (1, 2), (2, 1)]  # no unicorn category
    assert results[1]["bbox"] == [30, 10, 30, 30] and results[1]["score"] == 1.0
    assert _average_precision(coco, results, "segm") == pytest.approx(1.0)
    assert _average_precision(coco, results, "bbox") == pytest.approx(1.0)
    shifted = [dict(r, bbox=[r["bbox"][0] + 15, *r["bbox"][1:]]) for r in results]
    assert _average_precision(coco, shifted, "bbox") < 0.5  # the score does look at the boxes


def test_coco_results_without_a_category_map_number_labels_by_first_appearance():
    batch = [
        (7, [Object("dog", (0, 0, 5, 5), ""), Object("cat", (0, 0, 5, 5), "")]),
        (8, [Object("dog", (1, 1, 5, 5), "")]),
    ]
    results = to_coco_results(batch)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(7, 1), (7, 2), (8, 1)]
    assert "segmentation" not in results[0]


def _confidence(score: float):
    from postprocess.confidence import ObjectConfidence

    return ObjectConfidence(score=score, box_score=score, label_score=1.0, mask_score=None, edges=[], token_span=(0, 5))


def test_confidences_become_each_objects_score_in_json_and_coco():
    pieces = [Object("cat", (1, 2, 30, 40), ""), Text(" ; "), Object("dog", (5, 6, 20, 22), "")]
    data = to_json(pieces, W, H, confidences=[_confidence(0.8), _confidence(0.1)])
    assert [o["score"] for o in data["objects"]] == [0.8, 0.1]
    assert data["objects"][0]["confidence"]["token_span"] == [0, 5]
    coco = to_coco_results([(3, pieces, [_confidence(0.8), _confidence(0.1)])])
    assert [r["score"] for r in coco] == [0.8, 0.1]
    assert "score" not in to_json(pieces, W, H)["objects"][0]  # nothing recorded: no invented confidence


def test_one_confidence_per_object_or_a_message():
    pieces = [Object("cat", (1, 2, 30, 40), "")]
    with pytest.raises(ValueError, match="one per object"):
        to_json(pieces, W, H, confidences=[])
