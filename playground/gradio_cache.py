"""Pictures written to Gradio's file cache without truncating one that is being served.

Gradio saves every picture an output returns (the annotated image, each box or mask layer) under a folder
named by the hash of its bytes, with `Path.write_bytes`, which empties the file before writing it. Two
visitors who get the same picture (the same example, the same mask) write the same path, and a third may
be downloading it at that moment: the server declares the full length and sends nothing ("peer closed
connection without sending complete message body (received 0 bytes, expected 451)"). Writing under a
temporary name and renaming it into place keeps every reader on a complete file: a reader who already
opened the old file keeps it, a new reader gets the new one, both hold the same bytes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gradio import processing_utils
from PIL import Image


def save_pil_atomically(img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """Gradio's `save_pil_to_cache` (same arguments, same content-addressed path), written by rename."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(staging, path)  # also refreshes the file's age for Gradio's delete_cache
    return str(path)


def install() -> None:
    """Makes every Gradio component of this process save pictures with `save_pil_atomically` (they look the
    writer up on `gradio.processing_utils` at each call)."""
    processing_utils.save_pil_to_cache = save_pil_atomically
