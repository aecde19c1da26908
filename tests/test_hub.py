"""Hub downloads through a loopback stand-in of the Hub's HTTP API (tests/hub_stand_in.py): progress, gated
repos, bad tokens, a connection cut mid-file (resumed by a retry within the call, or by running again), offline
from the cache, and a full disk."""

import errno
import os
import time
from pathlib import Path

import pytest
from hub_stand_in import (  # noqa: F401 - provides the fixture
    BAD_TOKEN,
    HubStandIn,
    hf_repo_files_fixture,
    point_huggingface_hub_at,
)

from paligemma import hub
from paligemma.config import CheckpointError

REPO, GATED = "org/tiny-paligemma", "org/gated"


@pytest.fixture
def stand_in(tmp_path, monkeypatch, hf_repo_files):
    """The stand-in serving the tiny repo and a gated one; huggingface_hub pointed at it with a fresh cache."""
    from huggingface_hub import constants, file_download

    with HubStandIn() as server:
        server.add_repo(REPO, hf_repo_files)
        server.add_repo(GATED, hf_repo_files, gated=True)
        point_huggingface_hub_at(server, monkeypatch, str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # huggingface_hub writes (and so can resume from) whole 10 MB chunks; the tiny files need smaller ones.
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
        monkeypatch.setattr(file_download.time, "sleep", lambda s: None)  # the retry pauses
        yield server


def test_download_reports_progress_and_serves_the_repo(stand_in, hf_repo_files):
    seen = []
    start = time.perf_counter()
    folder = hub.resolve(REPO, progress=lambda name, done, total: seen.append((name, done, total)))
    elapsed = time.perf_counter() - start
    assert sorted(os.listdir(folder)) == sorted(hf_repo_files)
    weights = "model.safetensors"
    last = [s for s in seen if s[0] == weights][-1]
    assert last == (weights, len(hf_repo_files[weights]), len(hf_repo_files[weights]))
    print(f"download through the stand-in: {elapsed:.2f} s for {sum(map(len, hf_repo_files.values()))} bytes")


def test_second_run_works_offline_from_the_cache(stand_in, monkeypatch):
    from huggingface_hub import constants

    first = hub.resolve(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    count = len(stand_in.requests)
    assert hub.resolve(REPO) == first
    assert len(stand_in.requests) == count  # nothing asked of the network


def test_offline_without_cache_says_so(stand_in, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="cannot be reached and no cached copy"):
        hub.resolve(REPO)


def test_no_network_says_so(stand_in, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(CheckpointError, match="cannot be reached"):
        hub.resolve(REPO)


def test_gated_repo_without_and_with_a_token(stand_in, monkeypatch):
    with pytest.raises(CheckpointError, match=r"is gated: accept its licence.*HF_TOKEN") as without:
        hub.resolve(GATED)
    assert "no access yet" not in str(without.value)
    monkeypatch.setenv("HF_TOKEN", "hf_valid_but_not_granted")
    with pytest.raises(CheckpointError, match="the token given has no access yet"):
        hub.resolve(GATED)


def test_bad_token_has_its_own_message(stand_in):
    with pytest.raises(CheckpointError, match="token was refused"):
        hub.resolve(REPO, token=BAD_TOKEN)


def test_unknown_repo(stand_in):
    with pytest.raises(CheckpointError, match="was not found"):
        hub.resolve("org/missing")


def test_a_cut_connection_is_resumed_with_a_range_request(stand_in, hf_repo_files):
    size = len(hf_repo_files["model.safetensors"])
    stand_in.cut_file("model.safetensors", after=size // 3)
    folder = hub.resolve(REPO)
    assert (Path(folder) / "model.safetensors").read_bytes() == hf_repo_files["model.safetensors"]
    written = size // 3 // (64 * 1024) * (64 * 1024)  # whole chunks reached the file before the cut
    assert stand_in.gets_of("model.safetensors") == [None, f"bytes={written}-"]


def test_a_connection_that_stays_cut_gives_a_message_then_a_rerun_completes(stand_in, hf_repo_files):
    stand_in.cut_file("model.safetensors", after=1000, retries_to_kill=6)  # outlasts huggingface_hub's 5 retries
    with pytest.raises(CheckpointError, match="connection dropped while downloading.*run the same command again"):
        hub.resolve(REPO)
    completed = [n for n in hf_repo_files if n != "model.safetensors" and stand_in.gets_of(n)]
    folder = hub.resolve(REPO)
    assert (Path(folder) / "model.safetensors").read_bytes() == hf_repo_files["model.safetensors"]
    assert all(len(stand_in.gets_of(n)) == 1 for n in completed)  # files completed before the cut are kept


def test_full_disk_has_its_own_message(stand_in, monkeypatch):
    import huggingface_hub

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", full)
    with pytest.raises(CheckpointError, match="disk is full.*HF_HOME"):
        hub.resolve(REPO)


def test_cli_progress_draws_one_bar_per_file(capsys):
    report = hub.cli_progress()
    for done in (0, 50, 100):
        report("model.safetensors", done, 100)
    assert "model.safetensors" in capsys.readouterr().err


def test_not_a_source():
    with pytest.raises(CheckpointError, match="neither an existing file"):
        hub.resolve("not a repo")
