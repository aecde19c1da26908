"""The metrics on hand-made outputs: perfect, shifted, empty, wrong and extra answers."""

from pathlib import Path

import numpy as np
import pytest

from postprocess import MaskDecoder, format_object, join_objects
from scenes import evaluate, generate, tasks, vqvae_train
from scenes.dataset import seg_codes_of

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "demo"
SCENE = generate.compose_scene(
    [
        ("circle", "red", (10, 10, 60, 60)),
        ("circle", "blue", (100, 100, 150, 150)),
        ("square", "green", (160, 20, 210, 70)),
    ],
    np.random.default_rng(0),
)


@pytest.fixture(scope="module")
def shipped():
    return vqvae_train.load_vqvae(SHIPPED), MaskDecoder.load(SHIPPED / vqvae_train.DECODER_FILE)


def _box_text(label, box):
    return format_object(label, box, 224, 224)


def test_box_ious_by_hand():
    ious = evaluate.box_ious([(0, 0, 10, 10), (5, 0, 15, 10)], [(0, 0, 10, 10), (20, 20, 30, 30)])
    np.testing.assert_allclose(ious, [[1.0, 0.0], [50 / 150, 0.0]])
    assert evaluate.box_ious([], [(0, 0, 1, 1)]).shape == (0, 1)


def test_matching_is_one_to_one_from_the_best_pair():
    truth = [(0, 0, 50, 50)]
    assert evaluate.match_boxes([(0, 0, 50, 50), (0, 0, 50, 50)], truth) == [1.0]
    assert evaluate.match_boxes([(30, 0, 80, 50)], truth) == []  # IoU 20*50 / 4000 = 0.25


def test_perfect_detection():
    counts = evaluate.score_detection(SCENE, "detect circle", tasks.answer(SCENE, "detect circle"))
    assert counts.figures() == {"detection_found": 1.0, "detection_extra": 0.0, "detection_box_iou": 1.0}
    assert (counts.truth, counts.predicted, counts.matched) == (2, 2, 2)


def test_shifted_box_lowers_the_iou_until_it_no_longer_counts():
    shifted = evaluate.score_detection(SCENE, "detect red circle", _box_text("red circle", (20, 10, 70, 60)))
    assert shifted.figures()["detection_found"] == 1.0
    assert shifted.figures()["detection_box_iou"] == pytest.approx(40 * 50 / (2 * 2500 - 40 * 50))
    far = evaluate.score_detection(SCENE, "detect red circle", _box_text("red circle", (40, 10, 90, 60)))
    assert far.figures() == {"detection_found": 0.0, "detection_extra": 1.0, "detection_box_iou": None}


def test_empty_output_finds_nothing_and_adds_nothing():
    counts = evaluate.score_detection(SCENE, "detect circle", "")
    assert counts.figures() == {"detection_found": 0.0, "detection_extra": 0.0, "detection_box_iou": None}


def test_wrong_labels_duplicates_and_boxes_for_absent_things_are_extra():
    red = (10, 10, 60, 60)
    wrong_label = evaluate.score_detection(SCENE, "detect circle", _box_text("square", red))
    assert (wrong_label.matched, wrong_label.predicted) == (0, 1)
    duplicate = evaluate.score_detection(SCENE, "detect red circle", join_objects([_box_text("red circle", red)] * 2))
    assert duplicate.figures()["detection_extra"] == 0.5
    absent = evaluate.score_detection(SCENE, "detect triangle", _box_text("triangle", red))
    total = absent + evaluate.score_detection(SCENE, "detect red circle", _box_text("red circle", red))
    assert total.figures() == {"detection_found": 1.0, "detection_extra": 0.5, "detection_box_iou": 1.0}


def test_a_two_object_prompt_counts_each_objects_box_under_its_own_label():
    prompt = "detect red circle ; square"
    perfect = evaluate.score_detection(SCENE, prompt, tasks.answer(SCENE, prompt))
    assert (perfect.truth, perfect.predicted, perfect.matched) == (2, 2, 2)
    only_first = evaluate.score_detection(SCENE, prompt, _box_text("red circle", (10, 10, 60, 60)))
    assert only_first.figures()["detection_found"] == 0.5
    swapped = join_objects([_box_text("square", (10, 10, 60, 60)), _box_text("red circle", (160, 20, 210, 70))])
    assert evaluate.score_detection(SCENE, prompt, swapped).figures()["detection_extra"] == 1.0


def test_segmentation_iou_perfect_shifted_empty_and_negative(shipped):
    vqvae, decoder = shipped
    codes = seg_codes_of(SCENE, vqvae)
    perfect = tasks.answer(SCENE, "segment blue circle", codes)
    assert evaluate.score_segmentation(SCENE, "segment blue circle", perfect, decoder) > 0.95
    shifted = format_object("blue circle", (115, 100, 165, 150), 224, 224, seg_codes=codes[1])
    assert 0.35 < evaluate.score_segmentation(SCENE, "segment blue circle", shifted, decoder) < 0.6
    assert evaluate.score_segmentation(SCENE, "segment blue circle", "", decoder) == 0.0
    assert evaluate.score_segmentation(SCENE, "segment red square", "", decoder) is None
    assert (
        evaluate.score_segmentation(SCENE, "segment red square", perfect.replace("blue circle", "red square"), decoder)
        == 0.0
    )


def test_mask_iou_by_hand():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert evaluate.mask_iou(a, b) == pytest.approx(4 / 12)


def test_answers_are_exact_matches():
    assert evaluate.answer_is_right(SCENE, "answer en how many shapes are there?", " 3 ")
    assert not evaluate.answer_is_right(SCENE, "answer en how many shapes are there?", "three")
    assert evaluate.answer_is_right(SCENE, "caption en", "a red circle, a blue circle and a green square")
    assert not evaluate.answer_is_right(SCENE, "caption en", "a red circle, a green square and a blue circle")


def _oracle(seed, num_scenes, vqvae=None):
    """A generate_fn that knows every scene: the perfect model."""
    scenes = {generate.scene_for(seed, i).image.tobytes(): generate.scene_for(seed, i) for i in range(num_scenes)}
    batch_sizes = []

    def generate_fn(images, prompts):
        batch_sizes.append(len(prompts))
        found = [scenes[image.tobytes()] for image in images]
        return [tasks.answer(s, p, vqvae and seg_codes_of(s, vqvae)) for s, p in zip(found, prompts)]

    return generate_fn, batch_sizes


def test_perfect_model_meets_every_target(shipped):
    vqvae, decoder = shipped
    generate_fn, batch_sizes = _oracle(seed=21, num_scenes=6, vqvae=vqvae)
    mix = tasks.TaskMix(multi_detect=1, multi_segment=1)  # two-object prompts too
    figures = evaluate.evaluate_model(generate_fn, num_scenes=6, seed=21, mask_decoder=decoder, mix=mix, batch_size=8)
    assert max(batch_sizes) == 8 and sum(batch_sizes) == figures["prompts"]
    assert figures["segmentation_mask_iou"] > 0.95 and figures["multi_segmentation_mask_iou"] > 0.95
    keys = ("detection_found", "detection_extra", "multi_detection_found", "answer_accuracy", "caption_accuracy")
    assert {key: figures[key] for key in keys} == {
        "detection_found": 1.0,
        "detection_extra": 0.0,
        "multi_detection_found": 1.0,
        "answer_accuracy": 1.0,
        "caption_accuracy": 1.0,
    }
    assert evaluate.missed_targets(figures) == []


def test_silent_model_scores_zero_and_misses_targets():
    figures = evaluate.evaluate_model(lambda images, prompts: [""] * len(prompts), num_scenes=5, seed=22)
    assert figures["detection_found"] == 0.0 and figures["caption_accuracy"] == 0.0
    assert figures["segmentation_mask_iou"] is None  # no decoder given: no segment prompts
    assert figures["answer_accuracy"] == 0.0
    missed = evaluate.missed_targets(figures)
    assert any(line.startswith("detection_found") for line in missed)
    assert any(line.startswith("segmentation_mask_iou") for line in missed)
    assert not any(line.startswith("detection_extra") for line in missed)  # no boxes: none extra
    assert "caption_accuracy = 0.0 (target >= 0.9)" in missed


def test_generate_fn_returning_the_wrong_number_of_texts_is_refused():
    with pytest.raises(ValueError, match="returned 1 texts"):
        evaluate.evaluate_model(lambda images, prompts: ["2"], num_scenes=2, seed=0)
