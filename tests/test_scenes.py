"""The synthetic scenes follow their spec, and prompts get the exact answers."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from postprocess import init_decoder_params, objects, parse
from scenes import dataset, generate, tasks, vqvae_train
from scenes.generate import COLOUR_JITTER, COLOURS, IMAGE_SIZE, KINDS

SCENES = [generate.scene_for(seed=7, index=i) for i in range(150)]


def test_images_are_rgb_uint8_of_the_right_size():
    for scene in SCENES:
        assert scene.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert scene.image.dtype == np.uint8


def test_object_counts_kinds_and_colours_all_occur():
    assert {len(scene.objects) for scene in SCENES} == {1, 2, 3}
    assert {obj.kind for scene in SCENES for obj in scene.objects} == set(KINDS)
    assert {obj.colour for scene in SCENES for obj in scene.objects} == set(COLOURS)


def test_boxes_have_allowed_sides_lie_inside_and_match_their_masks():
    for scene in SCENES:
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= IMAGE_SIZE and 0 <= y1 < y2 <= IMAGE_SIZE
            assert 40 <= x2 - x1 <= 110 and 40 <= y2 - y1 <= 110
            if obj.kind != "triangle":
                assert x2 - x1 == y2 - y1
            ys, xs = np.nonzero(obj.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box


def test_objects_do_not_overlap_and_pairs_are_unique():
    for scene in SCENES:
        labels = [obj.label for obj in scene.objects]
        assert len(labels) == len(set(labels))
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert not generate.boxes_overlap(a.box, b.box)
                assert not (a.mask & b.mask).any()


def test_objects_are_solid_and_coloured_within_jitter():
    for scene in SCENES:
        for obj in scene.objects:
            pixels = scene.image[obj.mask]
            assert (pixels == pixels[0]).all()
            assert np.abs(pixels[0].astype(int) - COLOURS[obj.colour]).max() <= COLOUR_JITTER


def test_background_is_light_with_small_noise():
    for scene in SCENES[:40]:
        background = scene.image[~np.logical_or.reduce([obj.mask for obj in scene.objects])].astype(float)
        assert (background.mean(axis=0) >= 180 - 1).all()
        assert (background.std(axis=0) <= 8 * 1.05).all()
    stds = [scene.image[:8, :8].astype(float).std() for scene in SCENES]
    assert max(stds) > 2  # noise is really added somewhere


def test_objects_are_ordered_left_to_right_by_box_centre():
    for scene in SCENES:
        centres = [obj.box[0] + obj.box[2] for obj in scene.objects]
        assert centres == sorted(centres)


def test_scenes_are_deterministic_per_seed():
    again = generate.scene_for(seed=7, index=3)
    assert np.array_equal(again.image, SCENES[3].image)
    assert [o.box for o in again.objects] == [o.box for o in SCENES[3].objects]
    other = generate.scene_for(seed=8, index=3)
    assert not np.array_equal(other.image, SCENES[3].image)


@pytest.mark.parametrize(
    "placements, message",
    [
        ([("circle", "red", (0, 0, 50, 50)), ("square", "blue", (40, 40, 90, 90))], "overlap"),
        ([("circle", "red", (0, 0, 50, 50)), ("circle", "red", (60, 60, 110, 110))], "twice"),
        ([("circle", "red", (200, 0, 250, 50))], "inside"),
        ([("circle", "purple", (0, 0, 50, 50))], "colour"),
        ([("star", "red", (0, 0, 50, 50))], "kind"),
        ([], "1 to 3"),
    ],
)
def test_bad_placements_are_refused(placements, message):
    with pytest.raises(ValueError, match=message):
        generate.compose_scene(placements, np.random.default_rng(0))


# a hand-built scene, given out of order: left to right it is circle, triangle, square
HAND_BUILT = generate.compose_scene(
    [
        ("square", "blue", (120, 20, 180, 80)),
        ("circle", "red", (10, 30, 60, 80)),
        ("triangle", "green", (60, 130, 160, 200)),
    ],
    np.random.default_rng(0),
)
TWO_CIRCLES = generate.compose_scene(
    [("circle", "blue", (100, 100, 150, 150)), ("circle", "red", (10, 10, 60, 60))], np.random.default_rng(1)
)


@pytest.mark.parametrize(
    "scene, prompt, expected",
    [
        (HAND_BUILT, "caption en", "a red circle, a green triangle and a blue square"),
        (TWO_CIRCLES, "caption en", "a red circle and a blue circle"),
        (HAND_BUILT, "detect circle", "<loc0137><loc0046><loc0366><loc0274> circle"),
        (HAND_BUILT, "detect red circle", "<loc0137><loc0046><loc0366><loc0274> red circle"),
        (HAND_BUILT, "detect square", "<loc0091><loc0549><loc0366><loc0823> square"),
        (HAND_BUILT, "detect blue circle", ""),
        (
            TWO_CIRCLES,
            "detect circle",
            "<loc0046><loc0046><loc0274><loc0274> circle ; <loc0457><loc0457><loc0686><loc0686> circle",
        ),
        (TWO_CIRCLES, "detect triangle", ""),
        (
            HAND_BUILT,
            "detect square ; red circle",
            "<loc0091><loc0549><loc0366><loc0823> square ; <loc0137><loc0046><loc0366><loc0274> red circle",
        ),
        (HAND_BUILT, "detect blue circle ; square", "<loc0091><loc0549><loc0366><loc0823> square"),
        (HAND_BUILT, "detect blue circle ; green square", ""),
        (HAND_BUILT, "answer en how many shapes are there?", "3"),
        (TWO_CIRCLES, "answer en how many shapes are there?", "2"),
        (HAND_BUILT, "answer en what color is the triangle?", "green"),
        (HAND_BUILT, "answer en is there a green triangle?", "yes"),
        (HAND_BUILT, "answer en is there a green circle?", "no"),
    ],
)
def test_answers_on_hand_built_scenes(scene, prompt, expected):
    assert tasks.answer(scene, prompt) == expected


def test_segment_answers_put_the_objects_codes_after_its_box():
    codes = [[1] * 16, [2] * 16, [3] * 16]  # circle, triangle, square
    expected = "<loc0137><loc0046><loc0366><loc0274>" + "<seg001>" * 16 + " red circle"
    assert tasks.answer(HAND_BUILT, "segment red circle", codes) == expected
    assert tasks.answer(HAND_BUILT, "segment blue triangle", codes) == ""
    with pytest.raises(ValueError, match="seg_codes"):
        tasks.answer(HAND_BUILT, "segment red circle")


def test_a_segment_prompt_naming_two_objects_answers_both_in_prompt_order():
    codes = [[1] * 16, [2] * 16, [3] * 16]  # circle, triangle, square
    text = tasks.answer(HAND_BUILT, "segment blue square ; red circle", codes)
    assert text == (
        "<loc0091><loc0549><loc0366><loc0823>" + "<seg003>" * 16 + " blue square ; "
        "<loc0137><loc0046><loc0366><loc0274>" + "<seg001>" * 16 + " red circle"
    )


def test_prompts_naming_several_objects_parse_to_their_targets_in_order():
    query = tasks.parse_prompt("detect red circle ; triangle ; blue square")
    assert query.task == "multi_detect"
    assert [t.label for t in query.targets] == ["red circle", "triangle", "blue square"]
    assert tasks.parse_prompt("segment red circle ; blue square").task == "multi_segment"
    assert tasks.parse_prompt("detect red circle").task == "detect"


@pytest.mark.parametrize(
    "prompt",
    [
        "detect dog",
        "caption fr",
        "segment circle",
        "answer en what color is it?",
        "detect circle ;",
        "segment red circle ; square",
    ],
)
def test_unsupported_prompts_are_refused(prompt):
    with pytest.raises(ValueError, match="unsupported prompt"):
        tasks.parse_prompt(prompt)


def test_colour_question_needs_exactly_one_of_the_kind():
    with pytest.raises(ValueError, match="exactly one circle"):
        tasks.answer(TWO_CIRCLES, "answer en what color is the circle?")


def test_sampled_prompts_are_answerable_distinct_and_half_positive():
    rng = np.random.default_rng(0)
    positive = {"detect": [], "yes_no": [], "segment": []}
    for scene in SCENES:
        prompts = tasks.sample_prompts(scene, rng, with_segment=False)
        assert len(prompts) == len(set(prompts))
        for prompt in prompts:
            query = tasks.parse_prompt(prompt)
            assert query.task != "segment"
            text = tasks.answer(scene, prompt)  # raises for a colour question with no single answer
            if query.task in positive:
                positive[query.task].append(text not in ("", "no"))
        segment = tasks.sample_prompts(scene, rng, tasks.TaskMix(caption=0, detect=0, count=0, colour=0, yes_no=0))
        positive["segment"].append(any(tasks.parse_prompt(p).matches(o) for p in segment for o in scene.objects))
    for task, flags in positive.items():
        assert 0.4 <= np.mean(flags) <= 0.6, task


def test_sampled_multi_prompts_name_two_objects_no_object_can_match_twice():
    rng = np.random.default_rng(1)
    mix = tasks.TaskMix(caption=0, detect=0, segment=0, count=0, colour=0, yes_no=0, multi_detect=1, positive_rate=0.9)
    drawn = 0
    for scene in SCENES:
        for prompt in tasks.sample_prompts(scene, rng, mix, with_segment=False):
            query = tasks.parse_prompt(prompt)
            assert query.task == "multi_detect" and len(query.targets) == 2
            first, second = query.targets
            assert not first.overlaps(second)
            assert not any(first.matches(obj) and second.matches(obj) for obj in scene.objects)
            drawn += 1
    assert drawn == len(SCENES)


def test_a_task_can_have_its_own_share_of_present_targets():
    """Single prompts mostly about present objects, two-object ones half the time: each target drawn at its rate."""
    mix = tasks.TaskMix(
        caption=0, count=0, colour=0, yes_no=0, multi_detect=1, positive_rate=0.95, task_rates=(("multi_detect", 0.5),)
    )
    present = {"detect": [], "multi_detect": []}
    for index, scene in enumerate(SCENES):
        for prompt in tasks.sample_prompts(scene, np.random.default_rng([5, index]), mix, with_segment=False):
            query = tasks.parse_prompt(prompt)
            for target in query.targets:
                present[query.task].append(any(target.matches(obj) for obj in scene.objects))
    assert np.mean(present["detect"]) >= 0.9
    assert 0.4 <= np.mean(present["multi_detect"]) <= 0.6
    assert mix.rate_for("multi_segment") == 0.95 and mix.rate_for("multi_detect") == 0.5
    with pytest.raises(ValueError, match="yes_no's positive rate must lie in"):
        tasks.TaskMix(task_rates=(("yes_no", 1.5),))
    with pytest.raises(ValueError, match="'dance', not a task"):
        tasks.TaskMix(task_rates=(("dance", 0.5),))


def test_mix_strings_set_counts_and_rates_and_refuse_unknown_tasks():
    mix = dataset.parse_mix("detect=3,multi_detect=2@0.5,yes_no=1@.25", 0.93)
    assert (mix.detect, mix.multi_detect, mix.yes_no, mix.caption) == (3, 2, 1, tasks.DEFAULT_MIX.caption)
    assert [mix.rate_for(task) for task in ("detect", "multi_detect", "yes_no", "segment")] == [0.93, 0.5, 0.25, 0.93]
    assert dataset.parse_mix("", 0.8).rate_for("multi_segment") == 0.8
    for bad in ("dance=1", "detect=x", "detect=1@", "detect=1@2", "detect=1@0.5.5"):
        with pytest.raises(ValueError, match=f"bad --mix item '{bad}'"):
            dataset.parse_mix(bad, 0.5)


def test_adding_multi_prompts_to_a_mix_keeps_the_other_prompts():
    plain, with_multi = tasks.TaskMix(), tasks.TaskMix(multi_detect=1, multi_segment=1)
    for index, scene in enumerate(SCENES):
        before = tasks.sample_prompts(scene, np.random.default_rng([9, index]), plain)
        after = tasks.sample_prompts(scene, np.random.default_rng([9, index]), with_multi)
        assert after[: len(before)] == before
        assert {tasks.parse_prompt(p).task for p in after[len(before) :]} <= {"multi_detect", "multi_segment"}


def _random_vqvae():
    """Untrained but complete VQ-VAE params: enough to produce codes for the writer."""
    encoder = vqvae_train.init_encoder_params(np.random.default_rng(0))
    return {"encoder": encoder, "decoder": init_decoder_params(jax.random.key(0))}


def _read_lines(path):
    with open(path) as file:
        return [json.loads(line) for line in file]


def test_dataset_lines_are_well_formed_and_correct(tmp_path):
    summary = dataset.write_dataset(tmp_path, num_scenes=10, seed=3, valid_fraction=0.2)
    train, valid = _read_lines(tmp_path / "train.jsonl"), _read_lines(tmp_path / "valid.jsonl")
    assert summary["lines"] == {"train": len(train), "valid": len(valid)}
    assert {line["image"] for line in train} == {f"images/{i:06d}.png" for i in range(8)}
    assert {line["image"] for line in valid} == {"images/000008.png", "images/000009.png"}
    for line in train + valid:
        assert set(line) == {"image", "prefix", "suffix"}
        assert tasks.parse_prompt(line["prefix"]).task != "segment"  # no VQ-VAE given
        scene = generate.scene_for(3, int(line["image"][7:13]))
        assert line["suffix"] == tasks.answer(scene, line["prefix"])
        image = np.asarray(Image.open(tmp_path / line["image"]))
        assert np.array_equal(image, scene.image)


def test_a_mix_of_two_object_segment_prompts_alone_is_written_with_the_codes(tmp_path):
    vqvae = _random_vqvae()
    mix = tasks.TaskMix(caption=0, detect=0, segment=0, count=0, colour=0, yes_no=0, multi_segment=1)
    dataset.write_dataset(tmp_path, num_scenes=3, seed=4, vqvae_params=vqvae, mix=mix, valid_fraction=0.0)
    for line in _read_lines(tmp_path / "train.jsonl"):
        assert tasks.parse_prompt(line["prefix"]).task == "multi_segment"
        scene = generate.scene_for(4, int(line["image"][7:13]))
        assert line["suffix"] == tasks.answer(scene, line["prefix"], dataset.seg_codes_of(scene, vqvae))


def test_dataset_segment_lines_carry_the_encoders_codes(tmp_path):
    vqvae = _random_vqvae()
    mix = tasks.TaskMix(caption=0, detect=0, segment=1, count=0, colour=0, yes_no=0, positive_rate=1.0)
    dataset.write_dataset(tmp_path, num_scenes=3, seed=4, vqvae_params=vqvae, mix=mix, valid_fraction=0.0)
    lines = _read_lines(tmp_path / "train.jsonl")
    assert len(lines) == 3
    for index, line in enumerate(lines):
        scene = generate.scene_for(4, index)
        (found,) = objects(parse(line["suffix"], 224, 224))
        obj = next(o for o in scene.objects if o.label == found.label)
        assert found.box == obj.box
        codes = dataset.seg_codes_of(scene, vqvae)[scene.objects.index(obj)]
        assert found.seg_codes == tuple(codes)


def test_dataset_command_line(tmp_path, capsys):
    dataset.main(["--out", str(tmp_path), "--num-scenes", "2", "--seed", "5", "--mix", "detect=1,caption=0"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["scenes"] == 2 and "caption" not in summary["tasks"]
    with pytest.raises(SystemExit):
        dataset.main(["--out", str(tmp_path), "--num-scenes", "2", "--seed", "5", "--mix", "dance=2"])
