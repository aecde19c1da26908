import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

SCENE_TEXTS = [
    "caption en", "detect red circle", "detect square", "segment blue triangle", "a red circle and a blue square",
    "answer en how many shapes are there?", "answer en what color is the circle?", "answer en is there a green square?",
    "yes", "no", "1", "2", "3", "red", "green", "blue", "yellow", "describe en", "ocr", "question en what is this?",
]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A small Gemma-layout SentencePiece model with the loc/seg pieces, trained by the test session."""
    from paligemma.tokenizer import train_tokenizer

    prefix = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer")
    train_tokenizer(SCENE_TEXTS * 20, prefix, text_pieces=64)
    return prefix + ".model"
