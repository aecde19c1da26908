"""Any image a person may hand us -> the model's input: RGB, res×res, values in [-1, 1]."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Transparent pixels are shown on white, as an image viewer would show them.
_BACKGROUND = (255, 255, 255)
_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# The formats a person uploads. Pillow knows dozens more; some hand the file to other programs (EPS runs
# Ghostscript) or to decoders with a history of exploits, so anything else is refused before it is parsed.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # JPEG includes MPO, the multi-picture JPEG of cameras
ACCEPTED = "PNG, JPEG, WebP, GIF or BMP"


class ImageError(ValueError):
    """An image that cannot be read or used."""


def open_image(source) -> Image.Image:
    """Opens a path, bytes or file object in one of FORMATS (its first frame); unreadable, oversized or other
    input raises ImageError."""
    name = os.fspath(source) if isinstance(source, str | os.PathLike) else "the uploaded data"
    try:
        if isinstance(source, bytes | bytearray):
            source = io.BytesIO(source)
        image = Image.open(source, formats=FORMATS)
        image.load()  # the first frame of an animation
        return image
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name} has too many pixels to decode safely (more than {Image.MAX_IMAGE_PIXELS * 2:,}); resize it first"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"could not read an image from {name}: it is not a {ACCEPTED} image.") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"could not read an image from {name}: {err}. Use a {ACCEPTED} file.") from None


def to_rgb(image) -> Image.Image:
    """PIL image (any mode, EXIF-rotated) or uint8 array [H, W], [H, W, 1|3|4] -> RGB PIL image."""
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif isinstance(image, str | os.PathLike | bytes | bytearray):
        image = open_image(image)
    elif not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image, a uint8 array or an image file, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ImageError(f"the image is empty ({image.width}×{image.height} pixels)")
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(array, "RGB" if array.shape[2] == 3 else "RGBA")
    raise ImageError(f"image arrays must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")


def preprocess(image, size: int) -> np.ndarray:
    """-> float32 [size, size, 3] in [-1, 1] (bilinear, antialiased when shrinking)."""
    rgb = to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
