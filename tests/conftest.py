import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

SCENE_TEXTS = [
    "caption en", "detect red circle", "detect square", "segment blue triangle", "a red circle and a blue square",
    "answer en how many shapes are there?", "answer en what color is the circle?", "answer en is there a green square?",
    "yes", "no", "1", "2", "3", "red", "green", "blue", "yellow", "describe en", "ocr", "question en what is this?",
]


@pytest.fixture(scope="session", autouse=True)
def temporary_compile_cache(tmp_path_factory):
    """Compiled executables of the test session go to a fresh folder, not the user's ~/.cache (subprocesses
    inherit it too, unless a test sets its own)."""
    from paligemma import compile_cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(compile_cache.ENV, str(tmp_path_factory.mktemp("compile_cache")))
        yield


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A small Gemma-layout SentencePiece model with the loc/seg pieces, trained by the test session."""
    from paligemma.tokenizer import train_tokenizer

    prefix = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer")
    train_tokenizer(SCENE_TEXTS * 20, prefix, text_pieces=64)
    return prefix + ".model"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_path):
    """A random PaliGemma 2-style model in the big_vision .npz layout with its tokenizer beside it."""
    import shutil

    from paligemma.checkpoint import save_npz
    from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
    from paligemma.params import init_params
    from paligemma.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_path).vocab_size
    cfg = PaliGemmaConfig(
        VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=28),
        TextConfig(vocab_size=vocab, width=64, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=2, head_dim=16,
                   query_scale=16**-0.5, attn_softcap=50.0, final_softcap=30.0, post_norms=True),
    )
    folder = tmp_path_factory.mktemp("tiny_model")
    save_npz(str(folder / "model.npz"), init_params(cfg, seed=0, std=0.05))
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import paligemma

    return paligemma.load(str(tiny_model_dir))
