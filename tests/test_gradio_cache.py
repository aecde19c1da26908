"""Gradio's picture cache under concurrent visitors: a download in progress never sees a truncated file."""

from __future__ import annotations

import os

import numpy as np
from gradio import processing_utils
from PIL import Image

from playground import gradio_cache


def _picture() -> Image.Image:
    return Image.fromarray(np.arange(48 * 32 * 3, dtype=np.uint8).reshape(32, 48, 3))


def test_saving_the_same_picture_again_never_writes_into_the_file_a_download_holds(tmp_path):
    """Gradio's own writer empties and refills the served file in place; between the two a download that has
    declared the length reads nothing. Ours leaves the held file untouched and puts a new one in its place."""
    path = gradio_cache.save_pil_atomically(_picture(), str(tmp_path), format="png")
    with open(path, "rb") as download:
        held = os.fstat(download.fileno())
        again = gradio_cache.save_pil_atomically(_picture(), str(tmp_path), format="png")  # a second visitor
        assert again == path
        assert os.stat(path).st_ino != held.st_ino  # a new file took the name; the held one was not written
        assert len(download.read()) == held.st_size > 0
    assert Image.open(path).size == (48, 32)


def test_the_path_is_gradios_own_so_components_find_their_files(tmp_path, monkeypatch):
    ours = gradio_cache.save_pil_atomically(_picture(), str(tmp_path / "ours"), format="webp")
    theirs = processing_utils.save_pil_to_cache(_picture(), str(tmp_path / "theirs"), format="webp")
    assert ours.split("ours", 1)[1] == theirs.split("theirs", 1)[1]
    monkeypatch.setattr(processing_utils, "save_pil_to_cache", processing_utils.save_pil_to_cache)
    gradio_cache.install()
    assert processing_utils.save_pil_to_cache is gradio_cache.save_pil_atomically
    array = np.asarray(_picture())
    first = processing_utils.save_img_array_to_cache(array, str(tmp_path / "arrays"), format="png")
    with open(first, "rb") as download:  # masks are saved as arrays: they go through the installed writer
        assert processing_utils.save_img_array_to_cache(array, str(tmp_path / "arrays"), format="png") == first
        assert os.stat(first).st_ino != os.fstat(download.fileno()).st_ino
