"""Companion files (mask decoder, tokenizer): explicit, beside the weights, cached, from the Hub Space, from the
bucket, and the one-line message when none can be had; every file checked before use."""

import io
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hub_stand_in import (  # noqa: F401 - provides the fixture
    HubStandIn,
    hf_repo_files_fixture,
    point_companions_at,
    point_huggingface_hub_at,
)

from paligemma import companions
from paligemma.config import CheckpointError
from postprocess.vqvae import init_decoder_params, params_to_published


@pytest.fixture(scope="module")
def vae_bytes():
    """A random decoder written in the published vae-oid.npz layout."""
    buffer = io.BytesIO()
    np.savez(buffer, **params_to_published(init_decoder_params(jax.random.PRNGKey(0))))
    return buffer.getvalue()


@pytest.fixture
def stand_in(tmp_path, monkeypatch, vae_bytes, tokenizer_path):
    """The Hub stand-in with the Space big-vision/paligemma, and the same server standing in for the bucket."""
    with HubStandIn() as server:
        server.add_repo(companions.SPACE, {"vae-oid.npz": vae_bytes, "app.py": b""}, repo_type="space")
        server.static["/big_vision/paligemma_tokenizer.model"] = Path(tokenizer_path).read_bytes()
        point_huggingface_hub_at(server, monkeypatch, str(tmp_path / "hub"))
        point_companions_at(server, monkeypatch, str(tmp_path / "paligemma_cache"))
        yield server


def test_mask_decoder_comes_from_the_space_once(stand_in, tmp_path, vae_bytes):
    seen = []
    start = time.perf_counter()
    path = companions.find_mask_decoder(str(tmp_path), progress=lambda *a: seen.append(a))
    print(f"mask decoder from the Space stand-in: {time.perf_counter() - start:.2f} s")
    assert Path(path).read_bytes() == vae_bytes
    assert seen[-1] == ("vae-oid.npz", len(vae_bytes), len(vae_bytes))
    assert "/spaces/big-vision/paligemma/resolve/" in [p for m, p, r in stand_in.requests if m == "GET"][-1]
    count = len(stand_in.requests)
    assert companions.find_mask_decoder(str(tmp_path), offline=True) == path  # from the HF cache, no network
    assert len(stand_in.requests) == count


def test_mask_decoder_falls_back_to_the_bucket(stand_in, tmp_path, vae_bytes):
    del stand_in.repos[("space", companions.SPACE)]
    stand_in.static["/big_vision/paligemma/vae-oid.npz"] = vae_bytes
    path = companions.find_mask_decoder(None)
    assert path == os.path.join(companions.cache_folder(), "vae-oid.npz")
    assert Path(path).read_bytes() == vae_bytes


def test_tokenizer_comes_from_the_bucket_into_the_cache(stand_in, tokenizer_path):
    path = companions.find_tokenizer(None)
    assert path == os.path.join(companions.cache_folder(), "paligemma_tokenizer.model")
    assert Path(path).read_bytes() == Path(tokenizer_path).read_bytes()


def test_explicit_and_beside_the_weights_win(stand_in, tmp_path, tokenizer_path):
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    assert companions.find_tokenizer(str(tmp_path)) == str(tmp_path / "tokenizer.model")
    assert companions.find_tokenizer(None, explicit=tokenizer_path) == tokenizer_path
    assert stand_in.requests == []


def test_offline_and_missing_gives_one_line_saying_where_and_how(stand_in, tmp_path):
    with pytest.raises(companions.CompanionMissing) as missing:
        companions.find_mask_decoder(str(tmp_path), offline=True)
    message = str(missing.value)
    assert "\n" not in message
    for part in (
        "vae-oid.npz",
        "offline",
        "big-vision/paligemma",
        "/big_vision/paligemma/vae-oid.npz",
        "mask_decoder=PATH",
        "--mask-decoder",
        '"mask_decoder"',
    ):
        assert part in message


def test_unreachable_gives_the_message_too(stand_in, tmp_path):
    del stand_in.repos[("space", companions.SPACE)]
    with pytest.raises(companions.CompanionMissing, match="neither published copy could be downloaded"):
        companions.find_mask_decoder(str(tmp_path))


def test_files_are_checked_before_use(stand_in, tmp_path):
    wrong = tmp_path / "vae-oid.npz"
    np.savez(wrong, **{"_vq_vae._embedding": np.zeros((128, 7), np.float32)})
    with pytest.raises(CheckpointError, match="not a usable mask decoder"):
        companions.find_mask_decoder(str(tmp_path))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError, match="not a usable mask decoder"):
        companions.find_mask_decoder(None, explicit=pickled)
    (tmp_path / "bad.model").write_bytes(b"not sentencepiece")
    with pytest.raises(CheckpointError, match="not a usable SentencePiece tokenizer"):
        companions.find_tokenizer(None, explicit=tmp_path / "bad.model")


_FRESH_PROCESS = """
import json, sys, time
start = time.perf_counter()
from paligemma import companions, hub
import paligemma, postprocess
folder = hub.resolve(sys.argv[1])
decoder = companions.find_mask_decoder(folder)
downloaded = time.perf_counter()
model = paligemma.load(folder, mask_decoder=decoder)
text = model.generate(__import__("numpy").zeros((28, 28, 3), "uint8"), "segment circle", max_new_tokens=4)
masks = postprocess.MaskDecoder.load(model.mask_decoder_path)
print(json.dumps({"download_s": downloaded - start, "first_request_s": time.perf_counter() - downloaded,
                  "decoder": decoder, "masks": masks is not None}))
"""


@pytest.mark.slow
def test_a_fresh_process_with_hf_endpoint_downloads_then_runs_offline(stand_in, tmp_path, hf_repo_files):
    """HF_ENDPOINT and HF_HOME set before huggingface_hub is imported, as a user's shell would."""
    import json
    import subprocess
    import sys

    stand_in.add_repo("org/tiny-paligemma", hf_repo_files)
    env = {**os.environ, "HF_ENDPOINT": stand_in.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN", None)
    runs = []
    for offline in ("0", "1"):
        done = subprocess.run(
            [sys.executable, "-c", _FRESH_PROCESS, "org/tiny-paligemma"],
            capture_output=True,
            text=True,
            env={**env, "HF_HUB_OFFLINE": offline},
            timeout=300,
            cwd=os.path.dirname(os.path.dirname(companions.__file__)),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"fresh process through the stand-in: {runs[0]}; offline rerun: {runs[1]}")
    assert runs[0]["masks"] and runs[1]["decoder"] == runs[0]["decoder"]
    assert "hf_home" in runs[0]["decoder"]
