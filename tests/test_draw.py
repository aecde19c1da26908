"""Drawn pixels: box edges, mask fills, tags that stay on the image; the Gradio values; colours."""

import re

import numpy as np
import pytest
from PIL import Image, ImageColor

from postprocess.colors import PALETTE, label_color, label_colors, text_color_on
from postprocess.draw import (
    MASK_ALPHA,
    PAGE_OPACITY,
    annotated_image_value,
    draw_annotations,
    font_size,
    highlighted_text_value,
    label_tag_layout,
    line_width,
)
from postprocess.parse import Object, Text

RED = "#e6194b"


def _noise_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _disc(width, height, cx, cy, r):
    yy, xx = np.mgrid[:height, :width]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def test_box_edges_carry_the_label_colour():
    image = Image.new("RGB", (400, 300))
    box = (100, 120, 300, 200)
    drawn = np.array(draw_annotations(image, [Object("cat", box, "")], {"cat": RED}))
    rgb = ImageColor.getrgb(RED)

    for x, y in [(100, 160), (299, 160), (200, 199), (200, 120)]:  # left, right, bottom, top edges
        assert tuple(drawn[y, x]) == rgb
    assert tuple(drawn[160, 200]) == (0, 0, 0)  # the inside is not filled
    assert tuple(drawn[160, 310]) == (0, 0, 0)  # nothing beyond the box


def test_mask_fill_changes_pixels_inside_the_mask_only():
    image = _noise_image(320, 240)
    mask = _disc(320, 240, 150, 120, 60)
    box = (80, 50, 221, 191)  # clear of the disc, so the box outline covers none of its pixels
    with_mask = np.array(draw_annotations(image, [Object("ball", box, "", mask=mask)], {"ball": RED})).astype(int)
    without = np.array(draw_annotations(image, [Object("ball", box, "")], {"ball": RED})).astype(int)

    changed = (with_mask != without).any(axis=-1)
    assert not changed[~mask].any()
    assert changed[mask].mean() > 0.99
    rgb = np.array(ImageColor.getrgb(RED))
    interior = _disc(320, 240, 150, 120, 50)
    expected = np.round((1 - MASK_ALPHA) * np.array(image)[interior] + MASK_ALPHA * rgb)  # the photo shows through
    np.testing.assert_allclose(with_mask[interior], expected, atol=1)
    assert (with_mask[120, 150 - 60] == rgb).all()  # the outline is solid colour at the mask's edge


def test_mask_must_match_the_image():
    with pytest.raises(ValueError, match="mask"):
        draw_annotations(_noise_image(32, 32), [Object("a", (0, 0, 8, 8), "", mask=np.ones((8, 8), bool))])


@pytest.mark.parametrize("width, height", [(640, 480), (224, 224), (1024, 768), (90, 60)])
@pytest.mark.parametrize("corner", ["top-left", "top-right", "bottom-right", "whole image"])
@pytest.mark.parametrize("label", ["cat", "a very long label " * 8, "猫 Käse"])
def test_tags_stay_on_the_image(width, height, corner, label):
    boxes = {
        "top-left": (0, 0, width // 4, height // 4),
        "top-right": (width - 3, 0, width, 3),
        "bottom-right": (width - 5, height - 5, width, height),
        "whole image": (0, 0, width, height),
    }
    box = boxes[corner]
    text, (left, top, right, bottom) = label_tag_layout(label, box, width, height)

    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    assert text == label or (text.endswith("…") and label.startswith(text[:-1]))
    drawn = np.array(draw_annotations(Image.new("RGB", (width, height)), [Object(label, box, "")], {label: RED}))
    edge = ImageColor.getrgb(text_color_on(RED))  # the tag is drawn where laid out: filled, edged in its text colour
    assert tuple(drawn[top, left]) == tuple(drawn[bottom - 1, right - 1]) == edge
    assert tuple(drawn[top + 1, left + 1]) == tuple(drawn[bottom - 2, right - 2]) == ImageColor.getrgb(RED)


def test_tag_sits_above_the_box_when_there_is_room():
    _, (left, _, _, bottom) = label_tag_layout("dog", (100, 200, 300, 400), 640, 480)
    assert (left, bottom) == (100, 200)


def test_no_tag_on_an_image_too_small_for_text():
    assert label_tag_layout("cat", (0, 0, 4, 4), 8, 8) is None
    drawn = np.array(draw_annotations(Image.new("RGB", (8, 8)), [Object("cat", (0, 0, 4, 4), "")], {"cat": RED}))
    assert tuple(drawn[0, 0]) == ImageColor.getrgb(RED)  # the box is still drawn


def test_sizes_scale_with_the_image():
    assert line_width(90, 60) == 2 < line_width(224, 224) < line_width(1024, 768) == line_width(4000, 3000) == 4
    assert font_size(224, 224) < font_size(1024, 768) < font_size(4000, 3000)
    assert font_size(10, 10) >= 10


def test_unlabelled_objects_and_default_colours():
    image = Image.new("RGB", (200, 100))
    drawn = np.array(draw_annotations(image, [Text("see "), Object("", (10, 50, 60, 90), "")]))
    assert tuple(drawn[70, 10]) == ImageColor.getrgb(label_color(""))
    assert drawn[:50].max() == 0  # no tag above the box


def test_annotated_image_value_for_gradio():
    mask = _disc(64, 48, 20, 20, 10)
    image = Image.new("RGB", (64, 48))
    pieces = [Text("found "), Object("ball", (10, 10, 31, 31), "", mask=mask), Object("box", (40, 5, 60, 45), "")]
    stroke = line_width(64, 48)

    (base, annotations), colors = annotated_image_value(image, pieces)

    assert base.size == image.size and set(colors) == {"ball", "box"}
    (ball_alpha, ball), (box_alpha, box) = annotations
    assert (ball, box) == ("ball", "box")
    assert ball_alpha.shape == box_alpha.shape == (48, 64) and ball_alpha.dtype == np.float32
    assert ball_alpha[20, 20] == pytest.approx(MASK_ALPHA / PAGE_OPACITY)  # shows at MASK_ALPHA on the page
    assert ball_alpha[20, 10] == 1.0 and ball_alpha[~mask].max() == 0.0  # a solid outline, nothing outside
    assert box_alpha[25, 40] == box_alpha[5, 50] == 1.0  # the box is its outline, not a fill
    assert box_alpha[25, 50] == 0.0 and box_alpha[:, : 40 - 1].max() == 0.0
    assert (box_alpha[5 : 5 + stroke, 40:60] == 1.0).all()


def test_hidden_objects_keep_their_legend_entry_and_show_nothing():
    image = Image.new("RGB", (64, 48))
    pieces = [Object("ball", (10, 10, 31, 31), ""), Object("box", (40, 5, 60, 45), "")]

    (_, annotations), _ = annotated_image_value(image, pieces, hidden=["box"])

    assert [label for _, label in annotations] == ["ball", "box"]
    assert annotations[0][0].max() == 1.0 and annotations[1][0].max() == 0.0


def test_highlighted_text_value():
    pieces = [Text("I see "), Object("cat", (0, 0, 5, 5), "<loc…> cat ; "), Object("", (0, 0, 5, 5), "<loc…>")]
    assert highlighted_text_value(pieces) == [("I see ", None), ("cat", "cat"), ("<loc…>", None)]


def test_label_colours_are_stable_and_well_formed():
    first = label_colors(["cat", "dog", "cat"])
    assert list(first) == ["cat", "dog"]
    assert label_colors(["zebra", "dog"])["dog"] == first["dog"]  # independent of the other labels
    assert all(re.fullmatch(r"#[0-9a-f]{6}", color) for color in PALETTE)
    assert len(set(PALETTE)) == len(PALETTE)
    assert len({label_color(f"label {i}") for i in range(200)}) == len(PALETTE)  # the whole palette is used
    assert label_color("猫") in PALETTE


def test_text_colour_reads_on_its_tag():
    assert text_color_on("#ffffff") == "#000000" and text_color_on("#ffe119") == "#000000"
    assert text_color_on("#000000") == "#ffffff" and text_color_on("#4363d8") == "#ffffff"
