"""Shared by the app tests: a tiny model taught the detect example, a registry, and servers on free loopback ports.

The taught model (a few seconds of training with `paligemma.train`) answers three prompts about the detect
example exactly, so the tests can check real boxes and masks end to end without the demo model.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

import paligemma
import postprocess
from paligemma import train
from playground import prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(REPO, "assets", "examples")
DEMO_DIR = os.path.join(REPO, "assets", "demo")
LOOPBACK = "127.0.0.1"
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


@pytest.fixture(scope="session", name="taught_model_dir")
def taught_model_dir_fixture(tmp_path_factory, tokenizer_path):
    """model.npz + tokenizer.model + a random vae-oid.npz; fails loudly if the teaching did not take."""
    root = tmp_path_factory.mktemp("taught")
    example = detect_example()
    answers = taught_answers()
    data, out = root / "data", root / "model"
    data.mkdir()
    rows = [{"image": example.image, "prefix": prompt, "suffix": answer} for prompt, answer in answers.items()]
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = train._parser().parse_args([
        "--data", str(data), "--out", str(out), "--config", "tiny", "--tokenizer", tokenizer_path,
        "--steps", "60", "--batch-size", str(len(answers)), "--lr", "1e-2", "--eval-every", "1000000"])
    train.train(args)
    decoder = postprocess.params_to_published(postprocess.init_decoder_params(jax.random.key(0)))
    np.savez(out / "vae-oid.npz", **decoder)
    model = paligemma.load(str(out))
    image = Image.open(example.image)
    for prompt, answer in answers.items():
        assert model.generate(image, prompt) == answer, f"the tiny model did not learn {prompt!r}"
    return out


def write_registry(folder, taught_dir) -> str:
    """A registry with the taught model (default), a broken local one and an unreachable Hub one."""
    broken = folder / "broken"
    broken.mkdir()
    (broken / "model.npz").write_bytes(b"these are not weights")
    registry = {"default": TAUGHT, "models": [
        {"name": TAUGHT, "source": str(taught_dir), "notes": "taught three answers about one image"},
        {"name": BROKEN, "source": str(broken), "notes": "a corrupt checkpoint"},
        {"name": UNREACHABLE, "source": UNREACHABLE_REPO, "notes": "not on the Hub, and the Hub is out of reach"},
    ]}
    path = folder / "models.json"
    path.write_text(json.dumps(registry))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_page(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> float:
    """Seconds until `url` answers 200; fails if the server process dies or time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the server exited with code {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return time.monotonic() - start
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout_s} s")


@contextlib.contextmanager
def app_process(registry_file: str, log_path: str, env: dict[str, str] | None = None):
    """`python app.py` (the README's command) on a free loopback port: yields (url, seconds to serve the page)."""
    port = free_port()
    command = [sys.executable, os.path.join(REPO, "app.py"), "--host", LOOPBACK, "--port", str(port),
               "--models", registry_file]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})})
        try:
            url = f"http://{LOOPBACK}:{port}/"
            yield url, wait_for_page(url, 120, process)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def app_in_thread(registry_file: str):
    """The app served from this process (a background thread) on a free loopback port: yields its URL."""
    import app

    demo, models = app.create_app(registry_file)
    port = free_port()
    app.serve(demo, models, LOOPBACK, port, block=False)
    try:
        yield f"http://{LOOPBACK}:{port}/"
    finally:
        demo.close()
