import os

import pytest

# No test reaches the real Hub or bucket, in this process or in the ones it starts: a model without its mask
# decoder looks for it in a per-session cache and then at a loopback address where nothing listens (the discard
# port). Tests of the download paths point huggingface_hub at their own loopback stand-in.
NOWHERE = "http://127.0.0.1:9"
os.environ.setdefault("HF_ENDPOINT", NOWHERE)
os.environ.setdefault("PALIGEMMA_BUCKET", NOWHERE)

SCENE_TEXTS = [
    "caption en",
    "detect red circle",
    "detect square",
    "segment blue triangle",
    "a red circle and a blue square",
    "answer en how many shapes are there?",
    "answer en what color is the circle?",
    "answer en is there a green square?",
    "yes",
    "no",
    "1",
    "2",
    "3",
    "red",
    "green",
    "blue",
    "yellow",
    "describe en",
    "ocr",
    "question en what is this?",
]


@pytest.fixture(scope="session", autouse=True)
def temporary_compile_cache(tmp_path_factory):
    """The test session keeps its compiled executables in a persistent cache of its own, not the user's
    ~/.cache: every model loaded again from the same weights (each test that loads tiny_model_dir itself, each
    subprocess, which inherits the folder unless a test sets its own) reuses them instead of compiling again.
    Downloaded companion files (mask decoder, tokenizer) go to a session folder too."""
    import paligemma
    from paligemma import compile_cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(compile_cache.ENV, str(tmp_path_factory.mktemp("compile_cache")))
        patch.setenv("PALIGEMMA_CACHE", str(tmp_path_factory.mktemp("companion_cache")))
        paligemma.enable_compile_cache()
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

    from small_configs import tiny_gemma2_text

    from paligemma.checkpoint import save_npz
    from paligemma.config import PaliGemmaConfig, VisionConfig
    from paligemma.params import init_params
    from paligemma.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_path).vocab_size
    cfg = PaliGemmaConfig(
        VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=28),
        tiny_gemma2_text(vocab),
    )
    folder = tmp_path_factory.mktemp("tiny_model")
    save_npz(str(folder / "model.npz"), init_params(cfg, seed=0, std=0.05))
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import paligemma

    return paligemma.load(str(tiny_model_dir))


@pytest.fixture(scope="session")
def taught_model_dir(tmp_path_factory, tokenizer_path):
    """A tiny model taught three answers about the detect example (app_fixtures.teach), once per session."""
    from app_fixtures import teach

    return teach(tmp_path_factory.mktemp("taught"), tokenizer_path)
