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
    assert x.min() >= -1.0 and x.max() <= 1.0
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


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        ("not an image", "could not read"),
        (12, "expected a PIL image"),
        (b"GIF89a broken", "could not read"),
    ],
)
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


def _encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_truncated_files_are_clear_errors(fmt):
    data = _encoded(_image("RGB", (64, 48)), fmt)
    for length in (len(data) // 2, 40, 3):
        with pytest.raises(ImageError, match="could not read an image from the uploaded data"):
            to_rgb(open_image(data[:length]))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "MPO"])
def test_animations_and_multi_picture_files_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (24, 16), color) for color in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **options)
    image = open_image(data)
    assert image.n_frames == 3
    pixels = np.asarray(to_rgb(image), dtype=int)
    assert np.abs(pixels - (255, 0, 0)).max() <= (8 if fmt == "MPO" else 1)  # JPEG frames are approximate


def test_transparent_palette_entries_show_on_white():
    image = Image.new("P", (8, 4), 0)
    image.putpalette([255, 0, 0, 0, 200, 0] + [0] * 762)
    image.paste(1, (4, 0, 8, 4))
    for fmt in ("PNG", "GIF"):
        rgb = to_rgb(open_image(_encoded(image, fmt, transparency=0)))
        assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((7, 0)) == (0, 200, 0)


@pytest.mark.parametrize(
    "data",
    [
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",  # Pillow would hand it to Ghostscript
        _encoded(Image.new("RGB", (8, 8)), "TIFF"),
        _encoded(Image.new("RGB", (16, 16)), "ICO"),
        _encoded(Image.new("RGB", (8, 8)), "PPM"),
    ],
    ids=["eps", "tiff", "ico", "ppm"],
)
def test_formats_outside_the_accepted_ones_are_refused_unparsed(data):
    with pytest.raises(ImageError, match="not a PNG, JPEG, WebP, GIF or BMP image"):
        open_image(data)
