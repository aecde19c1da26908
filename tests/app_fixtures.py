"""Shared by the app tests: a tiny model taught the detect example, a registry, and an in-process server.

The taught model (a few seconds of training with `paligemma.train`) answers three prompts about the detect
example exactly, so the tests can check real boxes and masks end to end without the demo model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import paligemma
import postprocess
from paligemma import train
from playground import prompts
from playground.app_process import LOOPBACK, REPO, free_port

EXAMPLES_DIR = os.path.join(REPO, "assets", "examples")
DEMO_DIR = os.path.join(REPO, "assets", "demo")
TAUGHT = "taught"  # registry names used by the tests
BROKEN = "broken"
UNREACHABLE = "unreachable"
UNREACHABLE_REPO = "nobody-here/no-such-paligemma"
SEG_CODES = tuple(range(3, 19))  # any 16 codes: the test decoder is random


def detect_example() -> prompts.Example:
    """The gallery's 'detect red circle' example: an image with its true boxes."""
    return next(ex for ex in prompts.load_examples(EXAMPLES_DIR) if ex.prompt == "detect red circle")


def taught_answers() -> dict[str, str]:
    """What the taught model answers about the detect example, in PaliGemma's output format."""
    example = detect_example()
    width, height = Image.open(example.image).size
    target = next(obj for obj in example.objects if obj["label"] == "red circle")
    return {
        "caption en": "a red circle and a green triangle",
        "detect red circle": postprocess.format_object("red circle", target["box"], width, height),
        "segment red circle": postprocess.format_object("red circle", target["box"], width, height, SEG_CODES),
    }


def teach(root, tokenizer_path):
    """Trains the taught model under `root`: returns its folder, model.npz + tokenizer.model + a random
    vae-oid.npz; fails loudly if the teaching did not take."""
    example = detect_example()
    answers = taught_answers()
    data, out = root / "data", root / "model"
    data.mkdir()
    rows = [{"image": example.image, "prefix": prompt, "suffix": answer} for prompt, answer in answers.items()]
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = train._parser().parse_args(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--config",
            "tiny",
            "--tokenizer",
            tokenizer_path,
            "--steps",
            "60",
            "--batch-size",
            str(len(answers)),
            "--lr",
            "1e-2",
            "--eval-every",
            "1000000",
        ]
    )
    train.train(args)
    decoder = postprocess.params_to_published(postprocess.init_decoder_params(jax.random.key(0)))
    np.savez(out / "vae-oid.npz", **decoder)
    model = paligemma.load(str(out))
    image = Image.open(example.image)
    for prompt, answer in answers.items():
        assert model.generate(image, prompt) == answer, f"the tiny model did not learn {prompt!r}"
    return out


@pytest.fixture(scope="session", name="taught_model_dir")
def taught_model_dir_fixture(taught_model_dir):
    """conftest's session-wide taught model, for the test modules that import this name. A fixture defined
    here and imported into several modules would run once per module: the model would be taught again each time."""
    return taught_model_dir


def write_registry(folder, taught_dir) -> str:
    """A registry with the taught model (default), a broken local one (a sound tokenizer beside corrupt weights,
    so that loading fails on the weights) and an unreachable Hub one."""
    broken = folder / "broken"
    broken.mkdir()
    (broken / "model.npz").write_bytes(b"these are not weights")
    shutil.copy(os.path.join(taught_dir, "tokenizer.model"), broken / "tokenizer.model")
    registry = {
        "default": TAUGHT,
        "models": [
            {"name": TAUGHT, "source": str(taught_dir), "notes": "taught three answers about one image"},
            {"name": BROKEN, "source": str(broken), "notes": "a corrupt checkpoint"},
            {"name": UNREACHABLE, "source": UNREACHABLE_REPO, "notes": "not on the Hub, and the Hub is out of reach"},
        ],
    }
    path = folder / "models.json"
    path.write_text(json.dumps(registry))
    return str(path)


@contextlib.contextmanager
def app_in_thread(registry_file: str, preload: bool = True):
    """The app served from this process (a background thread) on a free loopback port: yields its URL. preload
    False: nothing runs before the first request (no warm-up or example runs sharing its batch)."""
    import app

    demo, models = app.create_app(registry_file, preload=preload)
    port = free_port()
    app.serve(demo, models, LOOPBACK, port, block=False)
    try:
        yield f"http://{LOOPBACK}:{port}/"
    finally:
        demo.close()
