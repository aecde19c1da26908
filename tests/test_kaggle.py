"""kaggle: sources through kagglehub, pointed at a local cache folder (KAGGLEHUB_CACHE) or at nothing."""

import os

import pytest
import requests

from paligemma import hub
from paligemma.config import CheckpointError

HANDLE = "google/paligemma-2/jax/paligemma2-3b-mix-224/1"


@pytest.fixture
def kaggle_cache(tmp_path, monkeypatch, tiny_model_dir):
    """kagglehub's cache as a finished model_download leaves it: the weights, a companion .npz, the marker."""
    cache = tmp_path / "kagglehub"
    folder = cache / "models" / "google/paligemma-2/jax/paligemma2-3b-mix-224/1"
    folder.mkdir(parents=True)
    os.link(tiny_model_dir / "model.npz", folder / "paligemma2-3b-mix-224.b16.npz")
    (folder / "vae-oid.npz").write_bytes(b"")
    marker = cache / "models/google/paligemma-2/jax/paligemma2-3b-mix-224/1.complete"
    marker.write_text("")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")  # http://localhost:7777: nothing there, so no network
    return folder


def test_a_versioned_handle_is_served_from_the_cache(kaggle_cache):
    seen = []
    path = hub.resolve("kaggle:" + HANDLE, progress=lambda *a: seen.append(a))
    assert path == str(kaggle_cache / "paligemma2-3b-mix-224.b16.npz")
    assert seen[-1][0] == "paligemma2-3b-mix-224" and seen[-1][1] == seen[-1][2] > 0


def test_the_picked_file_reads_as_a_checkpoint(kaggle_cache):
    from paligemma.checkpoint import read_checkpoint

    _, cfg = read_checkpoint(hub.resolve("kaggle:" + HANDLE))
    assert cfg.text.generation == 2


def test_no_network_and_no_cache_says_so(kaggle_cache):
    with pytest.raises(CheckpointError, match="Kaggle cannot be reached.*give the version"):
        hub.resolve("kaggle:google/paligemma-2/jax/paligemma2-10b-mix-224")


@pytest.mark.parametrize(
    "status, message", [(401, "accept the model's licence"), (403, "KAGGLE_USERNAME"), (404, "was not found on Kaggle")]
)
def test_http_refusals_have_clear_messages(kaggle_cache, monkeypatch, status, message):
    import kagglehub
    from kagglehub.exceptions import KaggleApiHTTPError

    response = requests.Response()
    response.status_code = status

    def refuse(handle):
        raise KaggleApiHTTPError("refused", response=response)

    monkeypatch.setattr(kagglehub, "model_download", refuse)
    with pytest.raises(CheckpointError, match=message):
        hub.resolve("kaggle:google/paligemma-2/jax/paligemma2-28b-mix-224")


def test_bad_handle_and_ambiguous_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a Kaggle model handle"):
        hub.resolve("kaggle:google/paligemma-2")
    for name in ("a.npz", "b.npz", "vae-oid.npz"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match="exactly one weights .npz; found: a.npz, b.npz"):
        hub.weights_in(str(tmp_path), "kaggle:x")
