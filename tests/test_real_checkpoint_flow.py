"""A published checkpoint as a new user meets it, through the loopback Hub stand-in: the CLI and the app's
ModelManager download a Hugging Face repo without vae-oid.npz, fetch the mask decoder from the Space, draw masks,
run again offline, refuse gated repos, dropped connections and models that do not fit with their own messages;
`kaggle:` sources come from kagglehub's cache."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hub_stand_in import (  # noqa: F401 - the fixtures
    HubStandIn,
    hf_repo_files_fixture,
    point_companions_at,
    point_huggingface_hub_at,
    publish_mask_decoder,
    taught_hf_files_fixture,
)
from PIL import Image

import paligemma
import postprocess
from paligemma import companions, memory_fit
from playground import registry
from playground.manager import ModelManager, ModelUnavailable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ID, GATED_ID = "org/taught-paligemma", "org/gated-paligemma"


def _child_env(server: HubStandIn, tmp_path) -> dict[str, str]:
    """The environment of a CLI child process whose huggingface_hub talks to `server`, without a token."""
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "PALIGEMMA_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "0",
    }
    env.pop("HF_TOKEN", None)
    return env


@pytest.fixture
def in_process_hub(tmp_path, monkeypatch):
    """The stand-in for huggingface_hub in this process (whose endpoint was read at import), with isolated caches."""
    with HubStandIn() as server:
        point_huggingface_hub_at(server, monkeypatch, str(tmp_path / "hub"))
        point_companions_at(server, monkeypatch, str(tmp_path / "paligemma_cache"))
        yield server


def _manager(tmp_path, models, memory=None):
    (tmp_path / "models.json").write_text(json.dumps({"models": models}))
    found = registry.build(str(tmp_path / "no-demo"), str(tmp_path / "models.json"))
    return ModelManager(found, **({"memory": memory} if memory else {}))


def _detect_image() -> str:
    from app_fixtures import detect_example

    return detect_example().image


# ---------------------------------------------------------------- the command line, as a user's shell runs it


def _predict(env, model, image, *extra):
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "paligemma",
            "predict",
            "--model",
            model,
            "--image",
            image,
            "--prompt",
            "segment red circle",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    return done, time.perf_counter() - start


@pytest.mark.slow
def test_cli_downloads_fetches_the_mask_decoder_draws_a_mask_and_reruns_offline(
    tmp_path, taught_hf_files, taught_model_dir
):
    with HubStandIn() as server:
        server.add_repo(REPO_ID, taught_hf_files)
        publish_mask_decoder(server, (taught_model_dir / "vae-oid.npz").read_bytes())
        env = _child_env(server, tmp_path)
        image = _detect_image()
        online, online_s = _predict(env, REPO_ID, image)
        assert online.returncode == 0, online.stderr[-3000:]
        requests_online = len(server.requests)
        offline, offline_s = _predict({**env, "HF_HUB_OFFLINE": "1"}, REPO_ID, image)
        assert offline.returncode == 0, offline.stderr[-3000:]
        assert len(server.requests) == requests_online  # the offline run asked the stand-in nothing
    first, again = json.loads(online.stdout), json.loads(offline.stdout)
    print(
        f"CLI through the stand-in: first run {online_s:.1f} s (download + load + first request: "
        f"load_s {first['timing']['load_s']:.2f}), offline rerun {offline_s:.1f} s (load_s "
        f"{again['timing']['load_s']:.2f})"
    )
    assert [o["label"] for o in first["objects"]] == ["red circle"] and first["objects"][0]["mask"] is True
    assert "warnings" not in first and again["objects"] == first["objects"]
    assert "model.safetensors" in online.stderr and "vae-oid.npz" in online.stderr  # the tqdm bars
    assert (
        server.gets_of("vae-oid.npz")
        and "/spaces/" in [p for m, p, _ in server.requests if p.endswith("vae-oid.npz")][-1]
    )


@pytest.mark.slow
def test_cli_gives_the_gated_and_the_dropped_connection_messages(tmp_path, hf_repo_files):
    with HubStandIn() as server:
        server.add_repo(GATED_ID, hf_repo_files, gated=True)
        server.add_repo(REPO_ID, hf_repo_files)
        server.cut_file("model.safetensors", after=1000, retries_to_kill=20)
        env = _child_env(server, tmp_path)
        image = str(tmp_path / "in.png")
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(image)
        gated, _ = _predict(env, GATED_ID, image)
        cut, _ = _predict(env, REPO_ID, image)
    assert gated.returncode == 2 and "is gated: accept its licence" in gated.stderr and "Traceback" not in gated.stderr
    assert cut.returncode == 2 and "Traceback" not in cut.stderr
    assert "connection dropped" in cut.stderr or "ended early" in cut.stderr, cut.stderr[-2000:]


# ---------------------------------------------------------------- the app's ModelManager


@pytest.mark.slow
def test_the_manager_shows_size_and_download_progress_and_loads_with_masks(
    in_process_hub, tmp_path, taught_hf_files, taught_model_dir
):
    in_process_hub.add_repo(REPO_ID, taught_hf_files)
    publish_mask_decoder(in_process_hub, (taught_model_dir / "vae-oid.npz").read_bytes())
    manager = _manager(tmp_path, [{"name": "standin", "source": REPO_ID}])
    size = manager.requirements("standin")
    weights = sum(
        len(data) for name, data in taught_hf_files.items() if name.endswith((".json", ".safetensors", ".model"))
    )
    assert size["download_bytes"] == weights and size["fits"] is True and size["gated"] is False
    assert "download" in size["text"] and "fits" in size["text"]
    seen = []
    start = time.perf_counter()
    ready = manager.get("standin", progress=lambda fraction, message: seen.append((fraction, message)))
    load_s = time.perf_counter() - start
    image = Image.open(_detect_image()).convert("RGB")
    start = time.perf_counter()
    text = ready.model.generate(image, "segment red circle")
    pieces = ready.masks.attach_masks(postprocess.parse(text, image.width, image.height), image.width, image.height)
    first_s = time.perf_counter() - start
    print(f"manager through the stand-in: download + load {load_s:.2f} s, first request {first_s:.2f} s")
    assert [o["mask"] for o in postprocess.to_json(pieces, image.width, image.height)["objects"]] == [True]
    messages = [m for _, m in seen]
    assert any(m.startswith("downloading model.safetensors: ") and " of " in m for m in messages), messages
    assert all(0 <= f <= 1 for f, _ in seen) and ready.mask_note is None
    assert "no masks" not in manager.status("standin")


def test_a_model_without_a_reachable_mask_decoder_serves_boxes_and_says_why(in_process_hub, tmp_path, hf_repo_files):
    in_process_hub.add_repo(REPO_ID, hf_repo_files)  # no Space and no bucket copy on the stand-in
    manager = _manager(tmp_path, [{"name": "standin", "source": REPO_ID}])
    ready = manager.get("standin")
    assert ready.masks is None and ready.model.mask_decoder_path is None
    assert "vae-oid.npz" in ready.mask_note and "--mask-decoder" in ready.mask_note
    assert "boxes only, no masks" in manager.status("standin")


def test_a_gated_repo_keeps_its_message_for_the_page(in_process_hub, tmp_path, hf_repo_files):
    in_process_hub.add_repo(GATED_ID, hf_repo_files, gated=True)
    manager = _manager(tmp_path, [{"name": "gated", "source": GATED_ID}])
    assert manager.requirements("gated")["gated"] is True
    with pytest.raises(ModelUnavailable, match="is gated"):
        manager.get("gated")
    assert "is gated" in manager.status("gated")


# ---------------------------------------------------------------- fit before fetch


@pytest.fixture
def small_memory(monkeypatch):
    """A machine with 1 KB free, wherever the free memory is measured."""
    monkeypatch.setattr(memory_fit, "free_bytes", lambda devices=None: (1_000, "host RAM"))


def _refusal_parts(message):
    for part in ("needs about", "has 1 KB free", "Would fit:"):
        assert part in message, message


def test_the_cli_refuses_a_model_that_does_not_fit(small_memory, tiny_model_dir, tmp_path, capsys):
    from paligemma.__main__ import main

    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(image)
    assert main(["predict", "--model", str(tiny_model_dir), "--image", str(image), "--prompt", "x"]) == 2
    _refusal_parts(capsys.readouterr().err)


def test_a_hub_model_that_does_not_fit_is_refused_before_its_weights_download(
    small_memory, in_process_hub, tmp_path, hf_repo_files
):
    in_process_hub.add_repo(REPO_ID, hf_repo_files)
    with pytest.raises(paligemma.DoesNotFit) as refused:
        paligemma.load(REPO_ID)
    _refusal_parts(str(refused.value))
    assert in_process_hub.gets_of("config.json") and not in_process_hub.gets_of("model.safetensors")


def test_the_picker_sizes_an_int8_model_by_its_int8_bytes(tiny_model_dir, tmp_path):
    models = [
        {"name": "f32", "source": str(tiny_model_dir), "dtype": "float32"},
        {"name": "q", "source": str(tiny_model_dir), "dtype": "int8"},
    ]
    manager = _manager(tmp_path, models, memory=lambda: 10**9)
    float32, int8 = manager.requirements("f32"), manager.requirements("q")
    assert int8["dtype"] == "int8" and "(int8) · fits" in int8["text"], int8
    assert 0 < int8["memory_bytes"] < float32["memory_bytes"]


def test_the_app_shows_and_refuses_a_model_that_does_not_fit(small_memory, tiny_model_dir, tmp_path):
    manager = _manager(tmp_path, [{"name": "tiny", "source": str(tiny_model_dir)}], memory=lambda: 1_000)
    size = manager.requirements("tiny")
    assert size["fits"] is False and "needs" in size["text"] and "more" in size["text"]
    with pytest.raises(ModelUnavailable) as refused:
        manager.get("tiny")
    _refusal_parts(str(refused.value))
    assert "needs about" in manager.status("tiny")


def test_sizes_never_block_and_say_unknown_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    manager = _manager(tmp_path, [{"name": "hub", "source": "google/paligemma2-3b-mix-224"}])
    assert manager.requirements("hub", wait=False)["text"] in ("size: checking…", manager.requirements("hub")["text"])
    size = manager.requirements("hub")
    assert size["text"].startswith("size unknown") and size["fits"] is None


# ---------------------------------------------------------------- kaggle: sources


KAGGLE = "google/paligemma-2/jax/paligemma2-3b-mix-224/1"


@pytest.fixture
def kaggle_cache(tmp_path, monkeypatch, tiny_model_dir):
    """kagglehub's cache as a finished download leaves it (weights and the marker; no tokenizer, no decoder)."""
    cache = tmp_path / "kagglehub"
    folder = cache / "models" / KAGGLE
    folder.mkdir(parents=True)
    os.link(tiny_model_dir / "model.npz", folder / "paligemma2-3b-mix-224.b16.npz")
    (cache / "models" / (KAGGLE + ".complete")).write_text("")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")  # http://localhost:7777: nothing there, so no network
    return folder


def test_a_kaggle_source_loads_through_the_registry_with_its_companions(
    kaggle_cache, tmp_path, tokenizer_path, taught_decoder
):
    manager = _manager(
        tmp_path,
        [
            {
                "name": "kaggle",
                "source": "kaggle:" + KAGGLE,
                "tokenizer": tokenizer_path,
                "mask_decoder": str(taught_decoder),
            }
        ],
    )
    assert manager.registry.get("kaggle").remote and manager.requirements("kaggle")["fits"] is None
    ready = manager.get("kaggle")
    assert ready.masks is not None and ready.model.source == "kaggle:" + KAGGLE
    assert ready.model.mask_decoder_path == str(taught_decoder)


def test_a_kaggle_source_without_a_tokenizer_names_the_file_and_how_to_pass_it(kaggle_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(companions.CACHE_ENV, str(tmp_path / "empty_cache"))
    monkeypatch.setattr(companions, "BUCKET", "http://127.0.0.1:9/big_vision")  # refused at once
    with pytest.raises(companions.CompanionMissing, match="paligemma_tokenizer.model.*tokenizer=PATH"):
        paligemma.load("kaggle:" + KAGGLE)


@pytest.fixture
def taught_decoder(tmp_path):
    """A random mask decoder in the published layout."""
    import jax

    import postprocess

    path = tmp_path / "vae-oid.npz"
    np.savez(path, **postprocess.params_to_published(postprocess.init_decoder_params(jax.random.key(0))))
    return path


def test_a_model_whose_default_dtype_does_not_fit_loads_in_a_smaller_one(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """No dtype asked for: where float32 does not fit, bfloat16, then int8; the load, the page and the CLI say
    why. An asked dtype is refused instead."""
    cfg = memory_fit.read_checkpoint_config(str(tiny_model_dir / "model.npz"))
    float32, bfloat16 = memory_fit.estimate(cfg, "float32").total, memory_fit.estimate(cfg, "bfloat16").total
    free = [float32 - 1]
    monkeypatch.setattr(memory_fit, "free_bytes", lambda devices=None: (free[0], "host RAM"))
    said = []
    model = paligemma.load(str(tiny_model_dir), status=said.append)
    assert model.dtype_name == "bfloat16" and model.dtype_note.startswith("bfloat16 because float32 would need")
    assert any(line.startswith("loading in bfloat16 because") for line in said), said
    image = np.full((28, 28, 3), 120, np.uint8)
    assert model.generate(image, "caption en", max_new_tokens=4) is not None
    with pytest.raises(paligemma.DoesNotFit):
        paligemma.load(str(tiny_model_dir), dtype="float32")

    free[0] = bfloat16 - 1
    model = paligemma.load(str(tiny_model_dir))
    assert model.dtype_name == "int8" and model.dtype == np.dtype("bfloat16") and "int8 because" in model.dtype_note
    *_, result = model.run([image], ["caption en"], max_new_tokens=4)
    assert len(result.token_ids[0]) >= 1

    manager = _manager(tmp_path, [{"name": "tiny", "source": str(tiny_model_dir)}], memory=lambda: free[0])
    size = manager.requirements("tiny")
    assert "(int8) · fits" in size["text"] and "float32 would need" in size["text"], size
    assert size["memory_bytes"] <= free[0]
    manager.get("tiny")
    assert "int8 because float32 would need" in manager.status("tiny")

    from paligemma.__main__ import main

    path = tmp_path / "in.png"
    Image.fromarray(image).save(path)
    assert main(["predict", "--model", str(tiny_model_dir), "--image", str(path), "--prompt", "x", "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert any(w.startswith("weights in int8 because float32 would need") for w in warnings), warnings
