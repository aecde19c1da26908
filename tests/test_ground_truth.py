"""Ground truth in its three forms, matching by IoU, and the drawn comparison (styles checked pixel by pixel)."""

import json

import numpy as np
import pytest
from PIL import Image, ImageColor

from postprocess import Object, format_object, join_objects
from postprocess.ground_truth import (
    STYLES,
    box_ious,
    compare,
    draw_comparison,
    parse_ground_truth,
)

W, H = 400, 300


def _obj(label, box):
    return Object(label=label, box=box, text="")


def test_suffix_text_gives_the_objects():
    text = join_objects(
        [format_object("cat", (40, 30, 200, 150), W, H), format_object("dog", (210, 100, 390, 290), W, H)]
    )
    truth = parse_ground_truth(text, W, H)
    assert [t.label for t in truth] == ["cat", "dog"]
    assert np.abs(np.subtract(truth[0].box, (40, 30, 200, 150))).max() <= 1


def test_malformed_suffix_is_refused_with_its_span():
    with pytest.raises(ValueError, match="not a well-formed object.*loc0300"):
        parse_ground_truth("<loc0100><loc0200><loc0300> cat", W, H)


def test_coco_style_boxes_with_category_or_label():
    text = json.dumps([{"bbox": [10, 20, 100, 50], "category": "cat"}, {"bbox": [0.4, 0, 30.2, 40], "label": " dog "}])
    truth = parse_ground_truth(text, W, H)
    assert [(t.label, t.box) for t in truth] == [("cat", (10, 20, 110, 70)), ("dog", (0, 0, 31, 40))]
    single = parse_ground_truth(json.dumps({"bbox": [10, 20, 100, 50], "category": "cat"}), W, H)
    assert single == truth[:1]


def test_coco_file_takes_this_images_annotations_by_name_and_scales_to_its_size():
    coco = {
        "images": [
            {"id": 1, "file_name": "a/one.jpg", "width": 800, "height": 600},
            {"id": 2, "file_name": "b/two.jpg", "width": 400, "height": 300},
        ],
        "annotations": [
            {"image_id": 1, "bbox": [100, 60, 200, 120], "category_id": 7},
            {"image_id": 2, "bbox": [1, 2, 3, 4], "category_id": 7},
        ],
        "categories": [{"id": 7, "name": "cat"}],
    }
    truth = parse_ground_truth(json.dumps(coco), W, H, image_name="/tmp/upload/one.jpg")
    assert [(t.label, t.box) for t in truth] == [("cat", (50, 30, 150, 90))]  # 800×600 → 400×300
    with pytest.raises(ValueError, match="2 images.*'three.jpg'"):
        parse_ground_truth(json.dumps(coco), W, H, image_name="three.jpg")
    coco["annotations"][0]["category_id"] = 8
    with pytest.raises(ValueError, match="category_id 8"):
        parse_ground_truth(json.dumps(coco), W, H, image_name="one.jpg")


def test_jsonl_line_of_the_fine_tuning_format():
    suffix = format_object("cat", (40, 30, 200, 150), W, H)
    line = json.dumps({"image": "one.jpg", "prefix": "detect cat", "suffix": suffix})
    assert [t.label for t in parse_ground_truth(line, W, H)] == ["cat"]
    other = json.dumps({"image": "two.jpg", "prefix": "detect cat", "suffix": ""})
    assert parse_ground_truth(other + "\n" + line, W, H, image_name="one.jpg")[0].label == "cat"
    assert parse_ground_truth(line + "\n" + other, W, H, image_name="two.jpg") == []  # nothing to find
    with pytest.raises(ValueError, match="2 JSONL lines"):
        parse_ground_truth(line + "\n" + other, W, H)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("a cat on a mat", "no <locNNNN> tokens"),
        ('{"bbox": [1, 2', "does not parse"),
        ('{"boxes": []}', "not ground truth"),
        ('[{"bbox": [1, 2, 3], "label": "cat"}]', "4 numbers"),
        ('[{"bbox": [1, 2, 0, 4], "label": "cat"}]', "no area"),
        ('[{"bbox": [500, 2, 10, 4], "label": "cat"}]', "outside"),
        ('[{"bbox": [1, 2, 3, 4]}]', "no label"),
        ('[{"bbox": [1, 2, 3, 4], "label": "a;b"}]', "must not contain"),
    ],
)
def test_bad_ground_truth_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_ground_truth(text, W, H)


def test_box_ious():
    ious = box_ious([(0, 0, 10, 10), (5, 0, 15, 10)], [(0, 0, 10, 10), (20, 20, 30, 30)])
    assert np.allclose(ious, [[1.0, 0.0], [50 / 150, 0.0]])
    assert box_ious([], [(0, 0, 1, 1)]).shape == (0, 1)


def test_matching_is_greedy_one_to_one_same_label_above_half():
    truth = [_obj("cat", (0, 0, 100, 100)), _obj("cat", (200, 0, 300, 100)), _obj("dog", (0, 150, 100, 250))]
    predicted = [
        _obj("cat", (10, 0, 100, 100)),  # IoU 0.9 with truth 0
        _obj("Cat ", (0, 0, 100, 100)),  # IoU 1.0 with truth 0: taken first, so the one above is left over
        _obj("cat", (0, 150, 100, 250)),  # right place, wrong label
        _obj("cat", (230, 0, 330, 100)),  # IoU 70/130 < ... = 0.538 with truth 1
    ]
    result = compare(predicted, truth)
    assert [(m.predicted, m.truth, round(m.iou, 3)) for m in result.matches] == [(1, 0, 1.0), (3, 1, 0.538)]
    assert result.misses == [2] and result.false_boxes == [0, 2]
    assert result.precision == 0.5 and result.recall == pytest.approx(2 / 3)
    assert "precision 0.50 (2 of 4 boxes right), recall 0.67 (2 of 3 found)" in result.summary()
    strict = compare(predicted, truth, threshold=0.6)
    assert [m.predicted for m in strict.matches] == [1]
    empty = compare([], [])
    assert empty.precision is None and empty.recall is None and "—" in empty.summary()


def test_with_scores_the_most_confident_prediction_matches_first():
    """COCO's rule: the IoU 0.9 box is surer than the IoU 1.0 one, so it takes the true box and the other is false."""
    truth = [_obj("cat", (0, 0, 100, 100))]
    predicted = [_obj("cat", (10, 0, 100, 100)), _obj("cat", (0, 0, 100, 100))]
    assert [m.predicted for m in compare(predicted, truth).matches] == [1]
    by_score = compare(predicted, truth, scores=[0.8, 0.3])
    assert [(m.predicted, round(m.iou, 2)) for m in by_score.matches] == [(0, 0.9)] and by_score.false_boxes == [1]


def test_drawing_shows_each_kind_in_its_own_style():
    image = Image.new("RGB", (W, H), (128, 128, 128))
    truth = [_obj("cat", (20, 60, 120, 160)), _obj("dog", (200, 60, 380, 200))]
    predicted = [_obj("cat", (24, 60, 120, 160)), _obj("bird", (150, 220, 250, 290))]
    result = compare(predicted, truth)
    assert [m.predicted for m in result.matches] == [0] and result.misses == [1] and result.false_boxes == [1]
    drawn = draw_comparison(image, predicted, truth, result)
    assert drawn.height > H and drawn.width == W  # the legend strip below
    pixels = np.asarray(drawn)
    match, miss, false = (np.array(ImageColor.getrgb(STYLES[k])) for k in ("match", "miss", "false"))

    assert (pixels[60 + 20 : 160, 24] == match).all()  # solid left edge of the matched prediction
    miss_edge = (pixels[61 + 40 : 199 - 10, 200] == miss).all(axis=1)  # the left edge of the missed dog
    assert 0.3 < miss_edge.mean() < 0.7 and not miss_edge.all()  # dashes and gaps
    assert (pixels[130:150, 381] == 128).all()  # nothing drawn outside the missed box
    inside_false = pixels[260, 200].astype(int)
    expected = np.round(false * 0.25 + 128 * 0.75)
    assert np.abs(inside_false - expected).max() <= 2  # the translucent fill of a false box
    assert (pixels[260, 150] == false).all()  # its solid outline
    legend = pixels[H:]
    for color in (match, miss, false):
        assert (legend == color).all(axis=2).any()


def test_a_narrow_picture_wraps_its_legend_so_every_entry_shows_whole():
    narrow = Image.new("RGB", (224, 224), (128, 128, 128))
    truth, predicted = [_obj("cat", (20, 20, 100, 100))], [_obj("dog", (120, 120, 200, 200))]
    drawn = draw_comparison(narrow, predicted, truth, compare(predicted, truth))
    wide = draw_comparison(Image.new("RGB", (W, H), (128, 128, 128)), predicted, truth, compare(predicted, truth))
    assert drawn.width == 224 and drawn.height - 224 > wide.height - H  # more legend rows than the wide picture's
    legend = np.asarray(drawn)[224:]
    false = np.array(ImageColor.getrgb(STYLES["false"]))
    rows_with_false = np.flatnonzero((legend == false).all(axis=2).any(axis=1))
    assert rows_with_false.size and rows_with_false[0] > (drawn.height - 224) // 2  # the last entry: a row of its own
    assert not (legend[:, -3:] != 255).any()  # nothing runs into the right edge
