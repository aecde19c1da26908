"""The persistent compilation cache: where it lives, how to switch it off, and that a restart reuses it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from paligemma import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One process of the app: load, answer one request, report its compilations, its compile requests that may use the
# persistent cache and those the cache served.
_REQUEST = """
import json, sys
import numpy as np
from jax import monitoring
hits, requests = [], []
monitoring.register_event_listener(lambda name, **_: hits.append(name) if name.endswith("cache_hits") else None)
monitoring.register_event_listener(lambda name, **_: requests.append(name) if name.endswith("use_cache") else None)
import paligemma
paligemma.enable_compile_cache()  # as the app and the CLI do
model = paligemma.load(sys.argv[1])
model.generate(np.zeros((20, 20, 3), np.uint8), "caption en", max_new_tokens=4)
print(json.dumps({"hits": len(hits), "requests": len(requests), "compiled": model.compile_count}))
"""


def test_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == str(tmp_path / "paligemma" / "jax")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.cache_dir() == str(tmp_path / "mine")
    for off in ("off", "0", "", "OFF "):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.cache_dir() is None


def _request_in_fresh_process(model_dir, cache: str) -> dict:
    env = {
        **os.environ,
        compile_cache.ENV: cache,
        "PYTHONPATH": ROOT,
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run(
        [sys.executable, "-c", _REQUEST, str(model_dir)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_restarted_process_loads_executables_from_the_cache(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _request_in_fresh_process(tiny_model_dir, str(cache))
    files = set(os.listdir(cache))
    assert first["hits"] == 0 and first["compiled"] == 2
    assert any("prefill" in f for f in files) and any("decode" in f for f in files), files
    second = _request_in_fresh_process(tiny_model_dir, str(cache))
    assert second["hits"] >= 2  # prefill and decode came from disk
    assert second["hits"] == second["requests"], second  # and so did every small one of loading and preprocessing
    assert {f for f in os.listdir(cache) if not f.endswith("-atime")} == {f for f in files if not f.endswith("-atime")}


@pytest.mark.slow
def test_switched_off_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _request_in_fresh_process(tiny_model_dir, "off")["hits"] == 0
    assert not (tmp_path / "paligemma").exists()


@pytest.mark.slow
def test_loading_a_model_leaves_the_cache_to_the_entry_point(tiny_model_dir, tmp_path):
    """Enabling the persistent cache is the app's, the CLI's or a benchmark's decision, not a side effect of load."""
    script = _REQUEST.replace("paligemma.enable_compile_cache()", "")
    env = {**os.environ, compile_cache.ENV: str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], env=env, check=True, timeout=300)
    assert not (tmp_path / "cache").exists()


def test_the_test_session_compiles_into_a_temporary_folder(tiny_model, tmp_path_factory):
    import jax

    tiny_model.generate(np.zeros((20, 20, 3), np.uint8), "caption en", max_new_tokens=2)
    folder = jax.config.jax_compilation_cache_dir
    assert folder.startswith(str(tmp_path_factory.getbasetemp())), folder
    assert os.listdir(folder)
