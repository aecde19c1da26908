"""The model's eye: the square the model saw, its patch grid, and boxes placed by their bins over the square."""

import numpy as np
import pytest
from PIL import Image, ImageColor

from paligemma.preprocess import preprocess
from postprocess.model_view import GRID_COLOR, model_eye, model_input, squash_note


def _photo(width, height):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_model_input_is_exactly_what_preprocess_feeds_the_model():
    photo = _photo(300, 120)
    seen = model_input(photo, 56)
    assert seen.size == (56, 56) and seen.mode == "RGB"
    assert np.array_equal(np.asarray(seen, np.float32) / 127.5 - 1.0, preprocess(photo, 56))


def test_grid_and_boxes_are_drawn_in_the_squares_coordinates():
    black = Image.new("RGB", (640, 160), (0, 0, 0))  # 4:1, squashed to a square
    text = "<loc0256><loc0512><loc0768><loc0896> cat"  # y 1/4..3/4, x 1/2..7/8 of the square
    eye = model_eye(black, text, image_size=224, patch_size=14)
    assert eye.size == (448, 448)  # enlarged ×2 to reach DISPLAY_SIDE
    pixels = np.asarray(eye).astype(int)
    grid_value = round(GRID_COLOR[3] / 255 * 255)
    assert abs(pixels[5, 28, 0] - grid_value) <= 1  # the first grid line: patch 14 × 2
    assert pixels[5, 27].max() == 0 and pixels[5, 29].max() == 0  # one pixel wide, between model pixels
    assert len({x for x in range(448) if pixels[5, x, 0] > 0}) == 448 // 28 - 1  # 15 inner lines across
    cat = np.array(ImageColor.getrgb("#e6194b"))
    eye = np.asarray(model_eye(black, text, image_size=224, patch_size=14, colors={"cat": "#e6194b"})).astype(int)
    assert (eye[300, 224] == cat).all() and (eye[300, 223] != cat).any()  # left edge: x = 512/1024 · 448
    assert (eye[112, 300] == cat).all() and (eye[111, 300] != cat).any()  # top edge: y = 256/1024 · 448
    assert (eye[335, 300] == cat).all() and (eye[336, 300] != cat).any()  # bottom edge: y2 = 336, half-open
    picked = pixels[300, 224]
    assert picked.max() > 0 and (pixels[112, 300] == picked).all()  # default: a colour that shows on black


def test_small_patches_and_large_inputs_keep_the_factor_at_one():
    assert model_eye(_photo(50, 50), "", image_size=896, patch_size=14).size == (896, 896)
    with pytest.raises(ValueError, match="patch_size"):
        model_eye(_photo(50, 50), "", image_size=224, patch_size=0)


def test_squash_note_tells_the_aspect_change():
    assert "aspect ratio kept" in squash_note(448, 448, 224)
    note = squash_note(640, 160, 224, patch_size=14)
    assert "×0.35 across and ×1.40 down" in note and "4.00× taller" in note and "16×16 patches" in note
