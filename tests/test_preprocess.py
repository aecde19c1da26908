"""Every image mode and size a person may upload becomes a valid model input, or a clear error."""

import io

import numpy as np
import pytest
from PIL import Image

from paligemma.preprocess import ImageError, open_image, preprocess, to_rgb


def _image(mode, size=(37, 23)):
    rgb = Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        return Image.fromarray((np.arange(size[0] * size[1], dtype=np.uint16) * 40).reshape(size[1], size[0]), "I;16")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "I", "F", "YCbCr"])
def test_modes_become_model_input(mode):
    x = preprocess(_image(mode), 28)
    assert x.shape == (28, 28, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert x.std() > 0.01  # the picture survived the conversion


def test_sixteen_bit_keeps_its_range():
    image = Image.fromarray(np.full((4, 4), 65535, np.uint16), "I;16")
    assert np.allclose(preprocess(image, 14), 1.0)


def test_transparent_pixels_show_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.allclose(preprocess(image, 14), 1.0)


def test_one_by_one_and_arrays():
    assert preprocess(Image.new("RGB", (1, 1), (0, 0, 0)), 14).max() == -1.0
    for array in [np.zeros((5, 7), np.uint8), np.zeros((5, 7, 1), np.uint8), np.zeros((5, 7, 4), np.uint8)]:
        assert preprocess(array, 14).shape == (14, 14, 3)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    assert to_rgb(open_image(buffer.getvalue())).size == (20, 40)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((4, 4, 3), np.float32), "uint8"), (np.zeros((4, 4, 2), np.uint8), "shape"), ("not an image", "could not read"),
    (12, "expected a PIL image"), (b"GIF89a broken", "could not read"),
])
def test_bad_images_are_clear_errors(bad, match):
    with pytest.raises(ImageError, match=match):
        preprocess(bad, 14)


def test_unreadable_bytes_name_the_upload_not_an_object():
    with pytest.raises(ImageError) as err:
        open_image(b"\x89PNG but not really")
    assert "the uploaded data" in str(err.value) and "BytesIO" not in str(err.value)


def test_decompression_bomb_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buffer, "PNG")
    with pytest.raises(ImageError, match="too many pixels"):
        open_image(buffer.getvalue())
