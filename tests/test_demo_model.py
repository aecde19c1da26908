"""The shipped demo model does what the app promises, on scenes it never saw in training."""

import json
from pathlib import Path

import pytest

import paligemma
import postprocess
from scenes.evaluate import TARGETS, evaluate_model, missed_targets

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
EVAL_SEED = 20261123  # training used scene seeds 2 (prompts), 3 and 1003 (encoder); these scenes are new
NUM_SCENES = 100


@pytest.fixture(scope="module")
def demo():
    return paligemma.load(str(DEMO))


@pytest.fixture(scope="module")
def figures(demo):
    decoder = postprocess.MaskDecoder.load(DEMO / "vae-oid.npz")
    figures = evaluate_model(lambda images, prompts: demo.generate_batch(images, prompts, max_new_tokens=64),
                             NUM_SCENES, EVAL_SEED, decoder, batch_size=16)
    print(json.dumps(figures, indent=1))
    return figures


def test_demo_model_fits_the_size_budget():
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 50 * 2**20


def test_demo_is_the_default_model():
    from paligemma.__main__ import DEFAULT_MODEL

    assert Path(DEFAULT_MODEL).resolve() == DEMO


# The shipped demo model (issue 5 stays open) meets the mask-IoU target, but finds about four objects in five,
# gives a few boxes too many on prompts that name absent objects, captions about two scenes in three, and its
# colour and yes/no answers fall just short. Strict: once a target is met its test fails, and the marker must go.
NOT_YET = pytest.mark.xfail(reason="demo model under-trained; issue 5 targets not met yet", strict=True)


def test_outputs_are_well_formed(figures):
    """Floors the current model holds, so that a rebuild cannot quietly get worse: it counts, names colours,
    answers yes/no, captions most scenes, finds most objects with tight boxes and masks, and gives few extra
    boxes (its last rounds trade some of those for finding three times as many objects)."""
    assert figures["prompts"] >= 5 * NUM_SCENES
    assert figures["count_accuracy"] >= 0.9 and figures["yes_no_accuracy"] >= 0.85
    assert figures["colour_accuracy"] >= 0.9 and figures["answer_accuracy"] >= 0.9
    assert figures["caption_accuracy"] >= 0.55
    assert figures["detection_found"] >= 0.7 and figures["detection_box_iou"] >= 0.9
    assert figures["detection_extra"] <= 0.15 and figures["segmentation_mask_iou"] >= 0.8


def test_mask_target_is_met(figures):
    assert not missed_targets(figures, ["segmentation_mask_iou"])


@NOT_YET
def test_all_targets_met(figures):
    assert figures["prompts"] >= 5 * NUM_SCENES
    assert not missed_targets(figures), missed_targets(figures)
    assert set(TARGETS) <= set(figures)


@pytest.mark.parametrize("task", ["count", pytest.param("colour", marks=NOT_YET),
                                  pytest.param("yes_no", marks=NOT_YET)])
def test_each_answer_kind_is_right(figures, task):
    assert figures[f"{task}_accuracy"] >= 0.95

