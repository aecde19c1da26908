"""The app's `/run` endpoint through gradio_client: detection, segmentation, captions, streaming and errors.

One in-process server per module, over a tiny model taught three answers about the detect example (see
app_fixtures), so every assertion checks real outputs. Then the registry, the prompts and the manager alone.
"""

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from app_fixtures import (
    BROKEN,
    DEMO_DIR,
    EXAMPLES_DIR,
    TAUGHT,
    UNREACHABLE,
    UNREACHABLE_REPO,
    app_in_thread,
    detect_example,
    taught_answers,
    taught_model_dir_fixture,  # noqa: F401 (a fixture)
    write_registry,
)
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
import paligemma
import postprocess
from paligemma import TokenScores
from playground import prompts, registry
from playground.debug_panel import NO_RUN
from playground.manager import ModelManager, ModelUnavailable
from playground.requests import NO_SCORES, Playground, _debug_run, filter_by_confidence, toggle_overlay


@pytest.fixture(scope="module")
def client(taught_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api_registry")
    with app_in_thread(write_registry(folder, taught_model_dir)) as url:
        yield Client(url, verbose=False)


HOT = "temperature(5.0)"  # so hot that the seed decides the answer, and an answer rarely ends before its limit


def _run(client, prompt, image=None, model=TAUGHT, decoding="greedy", max_new_tokens=64, seed="0"):
    image = detect_example().image if image is None else image
    upload = handle_file(str(image)) if image else None
    return client.predict(upload, prompt, model, decoding, max_new_tokens, seed, api_name="/run")


def _expected_object(prompt):
    text = taught_answers()[prompt]
    return postprocess.objects(postprocess.parse(text, 224, 224))[0]


def _opaque_region(png_path):
    """bool[H, W] where an annotation layer is drawn, and its RGB."""
    rgba = np.asarray(Image.open(png_path).convert("RGBA"))
    return rgba[..., 3] > 0, rgba[..., :3]


def _hex(rgb):
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


@pytest.mark.slow
def test_detection_gives_the_box_in_text_picture_and_json(client):
    highlighted, annotated, raw, detections, picture, timing = _run(client, "detect red circle")
    expected = _expected_object("detect red circle")
    color = postprocess.colors_on(Image.open(detect_example().image), [expected])["red circle"]  # picked on the image

    assert raw == taught_answers()["detect red circle"]
    assert highlighted == [{"token": "red circle", "class_or_confidence": "red circle"}]

    [annotation] = annotated["annotations"]
    assert annotation["label"] == "red circle"
    drawn, _ = _opaque_region(annotation["image"])
    rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == expected.box

    png = np.asarray(Image.open(picture).convert("RGB"))
    x1, y1, x2, y2 = expected.box
    assert png.shape == (224, 224, 3) and _hex(png[(y1 + y2) // 2, x1]) == color  # the box's left edge

    with open(detections) as f:
        exported = json.load(f)
    assert (exported["width"], exported["height"]) == (224, 224)
    [obj] = exported["objects"]
    assert obj["label"] == "red circle" and obj["mask"] is False and tuple(obj["box"]) == expected.box
    assert 0 < obj["score"] <= 1 and obj["confidence"]["score"] == round(obj["score"], 4)  # every run is scored
    truth = next(o["box"] for o in detect_example().objects if o["label"] == "red circle")
    assert np.abs(np.subtract(obj["box"], truth)).max() <= 1  # a bin of 1024 is under a pixel here

    assert timing["queue_s"] >= 0 and timing["prefill_s"] > 0 and timing["new_tokens"] > 4
    assert timing["tokens_per_s"] > 0 and timing["postprocess_s"] >= 0


@pytest.mark.slow
def test_segmentation_gives_a_mask_inside_its_box(client):
    highlighted, annotated, raw, detections, _, _ = _run(client, "segment red circle")
    expected = _expected_object("segment red circle")

    assert raw == taught_answers()["segment red circle"]
    assert highlighted == [{"token": "red circle", "class_or_confidence": "red circle"}]
    with open(detections) as f:
        [obj] = json.load(f)["objects"]
    assert obj["mask"] is True and tuple(obj["box"]) == expected.box
    mask = postprocess.mask_from_rle(obj["segmentation"])
    x1, y1, x2, y2 = expected.box
    assert mask.shape == (224, 224) and mask.any()
    assert not mask[:y1].any() and not mask[y2:].any() and not mask[:, :x1].any() and not mask[:, x2:].any()

    [annotation] = annotated["annotations"]
    drawn, _ = _opaque_region(annotation["image"])
    np.testing.assert_array_equal(drawn, mask)  # the page shows the very mask the JSON holds


@pytest.mark.slow
def test_caption_is_plain_text_without_detections(client):
    highlighted, annotated, raw, detections, picture, timing = _run(client, "caption en")
    assert raw == "a red circle and a green triangle"
    assert highlighted == [{"token": raw, "class_or_confidence": None}]
    assert annotated["annotations"] == [] and detections is None and picture is None
    assert timing["new_tokens"] > 1


@pytest.mark.slow
def test_the_api_gives_plain_values_plain_errors_and_a_description_for_callers(client):
    """No Gradio update dicts among the outputs, error text as it was written (not HTML-escaped), and an API page
    that tells a caller what to send and what comes back."""
    outputs = _run(client, "segment red circle")
    assert not any(isinstance(value, dict) and "__type__" in value for value in outputs), outputs
    assert isinstance(outputs[0], list) and set(outputs[1]) == {"image", "annotations"}

    with pytest.raises(AppError) as refused:
        _run(client, "caption en", decoding="<b>best</b> & co")
    assert "'<b>best</b> & co'" in str(refused.value) and "&lt;" not in str(refused.value)

    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert list(endpoints) == ["/run"]  # the page's own run, with its colours, is not part of the API
    description = endpoints["/run"]["description"]
    assert description.startswith("Runs a PaliGemma model on one image and prompt")
    assert "as the model wrote them" in description and "preprocess" not in description


@pytest.mark.slow
def test_text_streams_before_boxes_appear(client):
    job = client.submit(
        handle_file(detect_example().image), "segment red circle", TAUGHT, "greedy", 64, api_name="/run"
    )
    job.result()
    texts = [out[2] for out in job.outputs()]
    pictures = [out[1] for out in job.outputs()]
    final = taught_answers()["segment red circle"]
    assert texts[-1] == final
    assert any(0 < len(text) < len(final) for text in texts), texts  # partial text reached the client
    assert all(final.startswith(text) for text in texts)
    assert all(picture is None for picture in pictures[:-1]) and pictures[-1] is not None


@pytest.mark.slow
def test_sampled_decodings_run_and_are_reproducible(client):
    first = _run(client, "caption en", decoding="temperature(0.5)")[2]
    assert _run(client, "caption en", decoding="temperature(0.5)")[2] == first
    assert _run(client, "caption en", decoding="nucleus(0.1)")[2] == "a red circle and a green triangle"


@pytest.mark.slow
def test_a_seed_chooses_the_sampled_answer(client):
    first = _run(client, "caption en", decoding=HOT, max_new_tokens=12, seed="7")
    assert _run(client, "caption en", decoding=HOT, max_new_tokens=12, seed=" 7 ")[2] == first[2]
    assert first[5]["seed"] == 7
    others = {_run(client, "caption en", decoding=HOT, max_new_tokens=12, seed=str(seed))[2] for seed in (8, 9, 10)}
    assert others - {first[2]}  # another seed, another answer

    drawn = _run(client, "caption en", decoding=HOT, max_new_tokens=12, seed="random")[5]["seed"]
    assert 0 <= drawn <= paligemma.MAX_SEED


@pytest.mark.slow
@pytest.mark.parametrize("seed", ["-3", "1.5", "lucky", str(2**64)])
def test_a_bad_seed_gets_a_plain_message(client, seed):
    with pytest.raises(AppError, match="the seed must be a whole number from 0 to") as refused:
        _run(client, "caption en", decoding=HOT, seed=seed)
    assert "Traceback" not in str(refused.value) and "&#x27;" not in str(refused.value)


@pytest.mark.slow
def test_a_cancelled_run_frees_its_slot_at_once(client):
    """A long sampled run, cancelled once its text streams: the next run starts within a second and answers."""
    _run(client, "caption en")  # the next run's own compilation is not what this measures, alone or in the suite
    long = client.submit(
        handle_file(detect_example().image), "caption en", TAUGHT, HOT, paligemma.MAX_NEW_TOKENS, "3", api_name="/run"
    )
    deadline = time.monotonic() + 120
    while not any(out[2] for out in long.outputs()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not long.done(), "the run ended before it could be cancelled"
    long.cancel()

    raw, timing = (_run(client, "caption en")[i] for i in (2, 5))
    assert raw == "a red circle and a green triangle"
    assert timing["batch_wait_s"] < 1.0  # the cancelled run no longer holds the model
    deadline = time.monotonic() + 10
    while not long.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert long.done() and len(long.outputs()[-1][2]) < 4 * paligemma.MAX_NEW_TOKENS


@pytest.mark.slow
def test_a_page_that_leaves_mid_run_cancels_the_run_and_frees_its_slot(client, caplog):
    """A visitor who closes or reloads the page drops its event stream (done here by hand, as a browser does): the
    long sampled run is cancelled, so the next run starts within a second, and the server log says so."""
    import uuid

    import httpx

    _run(client, "caption en")  # as above: the next run's compilation is done before the page leaves
    base = client.src.rstrip("/")
    config = httpx.get(f"{base}/config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "run")
    with open(detect_example().image, "rb") as picture:
        (path,) = httpx.post(f"{base}/gradio_api/upload", files={"files": picture}).json()
    session = uuid.uuid4().hex
    image = {"path": path, "meta": {"_type": "gradio.FileData"}}
    data = [image, "caption en", TAUGHT, HOT, paligemma.MAX_NEW_TOKENS, "3"]
    join = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    with caplog.at_level(logging.INFO, logger="playground.requests"):
        httpx.post(f"{base}/gradio_api/queue/join", json=join).raise_for_status()
        params = {"session_hash": session}
        with httpx.stream("GET", f"{base}/gradio_api/queue/data", params=params, timeout=120) as events:
            for line in events.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_generating" and message["output"]["data"][2]:
                    break  # its text streams: the page leaves now
            else:
                pytest.fail("the run ended before its page could leave")

        raw, timing = (_run(client, "caption en")[i] for i in (2, 5))
        assert raw == "a red circle and a green triangle"
        assert timing["batch_wait_s"] < 1.0  # the abandoned run no longer holds the model
        assert "'caption en' on 'taught' cancelled after" in caplog.text


@pytest.fixture
def bad_files(tmp_path):
    not_image = tmp_path / "holiday.png"
    not_image.write_bytes(b"this is text, not a picture")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 4000), (200, 200, 200)).save(huge)  # 20 MP, a few kB as PNG
    return {"not_image": not_image, "huge": huge}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("no image", "Upload an image first"),
        ("not_image", "could not read an image"),
        ("huge", "megapixels"),
        ("empty prompt", "Type a prompt"),
    ],
)
def test_bad_requests_get_a_message_for_a_person(client, bad_files, case, message):
    image = {"no image": "", "empty prompt": None}.get(case, bad_files.get(case))
    prompt = "  " if case == "empty prompt" else "detect red circle"
    with pytest.raises(AppError, match=message):
        _run(client, prompt, image=image)


@pytest.mark.parametrize("case, message", [("not_image", "could not read an image"), ("huge", "megapixels")])
def test_a_bad_upload_is_refused_as_it_arrives(bad_files, case, message, monkeypatch, tmp_path):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # where Gradio keeps uploads: the files are uploads
    said = app._check_upload(str(bad_files[case]))
    assert said.startswith("⚠️") and message in said


def test_a_good_upload_passes_and_the_limits_are_stated(monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", EXAMPLES_DIR)
    assert app._check_upload(detect_example().image) == "" and app._check_upload(None) == ""
    assert "10MB" in app.LIMITS and "megapixels" in app.LIMITS


@pytest.mark.slow
def test_a_model_outside_the_registry_is_refused(client, tmp_path):
    with pytest.raises(AppError, match="unknown model"):
        _run(client, "caption en", model=str(tmp_path))


@pytest.mark.slow
def test_models_that_cannot_load_say_why_and_the_others_keep_serving(client, monkeypatch, caplog):
    secret = "hf_thisMustNeverBeShown"
    monkeypatch.setenv("HF_TOKEN", secret)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AppError, match=f"{BROKEN}: .*model.npz"):  # its weights, not its sound tokenizer
            _run(client, "caption en", model=BROKEN)
        with pytest.raises(AppError, match=UNREACHABLE_REPO) as unreachable:
            _run(client, "caption en", model=UNREACHABLE)
    assert secret not in str(unreachable.value) and secret not in caplog.text
    assert _run(client, "caption en")[2] == "a red circle and a green triangle"


# ---------------------------------------------------------------- the parts alone


@pytest.mark.parametrize("task", prompts.TASK_NAMES)
def test_prompts_compose_and_split_back(task):
    prompt = prompts.compose(task, "de", "a ; b" if prompts.task_named(task).argument else "")
    parsed, language, argument = prompts.split(prompt)
    assert parsed.name == task
    assert language == ("de" if parsed.takes_language else None)
    assert argument == ("a ; b" if parsed.argument else "")


def test_retarget_keeps_what_was_typed():
    assert prompts.retarget("answer en what is red?", "question", "fr") == "question fr what is red?"
    assert prompts.retarget("detect cat ; dog", "caption", "en") == "caption en"
    assert prompts.retarget("caption en", "detect", "en") == "detect "
    assert prompts.split("what is this?") == (None, None, "what is this?")


def test_examples_show_what_the_demo_model_answers_with_existing_images():
    examples = prompts.load_examples(EXAMPLES_DIR)
    # The demo model's own tasks; it was never taught describe, OCR or question, so the gallery does not offer them.
    assert {ex.task for ex in prompts.examples_for(registry.DEMO_NAME, examples)} == {
        "caption",
        "answer",
        "detect",
        "segment",
    }
    for ex in examples:
        task, _, _ = prompts.split(ex.prompt)
        assert task.name == ex.task
        Image.open(ex.image).verify()


def test_registry_reads_json_yaml_and_the_environment(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "default": "local",
                "models": [
                    {"name": "local", "source": "weights", "notes": "n", "dtype": "float32"},
                    {"name": "hub", "source": "google/paligemma2-3b-mix-224"},
                ],
            }
        )
    )
    (tmp_path / "b.yaml").write_text("models:\n  - name: y\n    source: ./weights\n")
    models = registry.build(str(tmp_path / "demo"), str(tmp_path / "a.json"), "env=org/model, other/repo")
    assert models.names == ["demo", "local", "hub", "env", "other/repo"] and models.default == "local"
    assert models.get("local").source == str(tmp_path / "weights") and models.get("local").dtype == "float32"
    assert models.get("hub").on_hub and not models.get("local").on_hub
    assert models.local_sources() == [str(tmp_path / "demo"), str(tmp_path / "weights")]
    yaml_models = registry.build(str(tmp_path / "demo"), str(tmp_path / "b.yaml"))
    assert yaml_models.get("y").source == str(tmp_path / "weights") and yaml_models.default == "demo"


@pytest.mark.parametrize(
    "content, message",
    [
        ({"models": [{"name": "demo", "source": "x/y"}]}, "two models are named 'demo'"),
        ({"models": [{"name": "a", "source": "x/y", "path": "/etc"}]}, "unknown model fields"),
        ({"models": [{"name": "a"}]}, "needs a source"),
        ({"models": [{"name": "a", "source": "x/y", "dtype": "int4"}]}, "unknown dtype"),
        ({"default": "zzz", "models": []}, "default model 'zzz'"),
        ({"models": [{"name": "a", "source": "x/y", "tasks": ["caption", "dance"]}]}, "'a': unknown tasks .*dance"),
        ({"models": [{"name": "a", "source": "x/y", "tasks": "detect"}]}, "'a': tasks must be a non-empty list"),
        ({"model": []}, "expected"),
    ],
)
def test_registry_errors_say_what_is_wrong(tmp_path, content, message):
    (tmp_path / "r.json").write_text(json.dumps(content))
    with pytest.raises(registry.RegistryError, match=message):
        registry.build(str(tmp_path / "demo"), str(tmp_path / "r.json"))


def test_each_model_offers_the_tasks_it_knows(tmp_path):
    (tmp_path / "r.json").write_text(
        json.dumps(
            {
                "models": [
                    {"name": "tuned", "source": "x/y", "tasks": ["Detect", "ocr", "caption"]},
                    {"name": "mix", "source": "x/z"},
                ]
            }
        )
    )
    models = registry.build(str(tmp_path / "demo"), str(tmp_path / "r.json"))
    assert models.get("demo").tasks == ("caption", "answer", "detect", "segment")  # never taught the others
    assert models.get("tuned").tasks == ("caption", "OCR", "detect")  # by name or keyword, in the page's order
    assert models.get("mix").tasks == prompts.TASK_NAMES  # a published checkpoint: every task

    kept, prompt, language = app._tasks_for(models, "demo", "detect", "en", "detect cat")
    assert kept.choices == [(t, t) for t in registry.DEMO_TASKS] and prompt == language == gr.skip()
    switched, prompt, language = app._tasks_for(models, "demo", "OCR", "en", "ocr")
    assert switched.value == "caption" and prompt == "caption en" and language.visible
    assert app._task_of_prompt("describe en", models.get("demo").tasks) == (gr.skip(), gr.skip())  # no such chip
    assert app._task_of_prompt("describe en", models.get("mix").tasks)[0] == "describe"


@pytest.fixture
def playground():
    return Playground(manager=None)  # its downloads folder lives as long as it does


def _scored_outcome(playground):
    """Two boxes from a hand-made run: a sure cat (each token 0.9, score 0.81) and an unsure dog (0.3, 0.09)."""
    tokenizer = paligemma.Tokenizer(os.path.join(DEMO_DIR, "tokenizer.model"))
    text = "<loc0100><loc0100><loc0400><loc0400> cat ; <loc0500><loc0500><loc0900><loc0900> dog"
    ids = tokenizer.encode(text)
    cut = ids.index(tokenizer.loc_ids[500])
    probs = np.array([0.9] * cut + [0.3] * (len(ids) - cut))
    scores = TokenScores(ids, np.log(probs), np.asarray(ids)[:, None], np.log(probs)[:, None])
    picture = Image.new("RGB", (200, 100), (90, 90, 90))
    return playground._annotations(text, picture, picture, None, scores, tokenizer), scores


def test_a_scored_run_tags_each_box_with_its_confidence_and_the_slider_hides_the_unsure_one(playground):
    outcome, _ = _scored_outcome(playground)
    assert [round(c["score"], 2) for c in outcome.confidences] == [0.81, 0.09]
    with open(outcome.detections) as f:
        assert [round(o["score"], 2) for o in json.load(f)["objects"]] == [0.81, 0.09]
    (_, layers), colors = outcome.page_annotated()
    assert [label for _, label in layers] == ["cat 0.810", "dog 0.090"] and set(colors) == {"cat 0.810", "dog 0.090"}
    assert [label for _, label in outcome.annotated[1]] == ["cat", "dog"]  # the API's labels stay the model's

    hidden, stored = filter_by_confidence(outcome, 0.5)
    assert [a["label"] for a in hidden.value["annotations"]] == ["cat 0.810"] and stored.min_score == 0.5
    assert outcome.min_score == 0.0  # the stored outcome (e.g. an example's, computed ahead) is not changed
    click = gr.SelectData(None, {"index": 0, "value": "cat 0.810"})
    toggled, off = toggle_overlay(stored, click)
    [cat] = toggled.value["annotations"]
    assert off.hidden == {"cat"} and cat["label"] == "cat 0.810" and not _opaque_region(cat["image"]["path"])[0].any()
    assert filter_by_confidence(stored, 0.5) == (gr.skip(), gr.skip())  # nothing moved: nothing redrawn
    assert filter_by_confidence(None, 0.5) == (gr.skip(), gr.skip())


def test_the_debug_panel_gets_the_run_or_says_why_it_has_none(playground):
    outcome, scores = _scored_outcome(playground)

    demo = SimpleNamespace(  # what _debug_run reads of a paligemma.Model
        tokenizer=paligemma.Tokenizer(os.path.join(DEMO_DIR, "tokenizer.model")),
        config=SimpleNamespace(image_size=224, vision=SimpleNamespace(patch_size=14)),
    )
    run, note = _debug_run(outcome, scores, demo, "/uploads/pets.png")
    assert note == "" and run.labels == ["cat", "dog"] and run.image_name == "pets.png"
    assert run.colors == outcome.colors and [c["score"] for c in run.confidences] == [
        c["score"] for c in outcome.confidences
    ]

    unscored = playground._annotations(outcome.text, outcome.display, outcome.display, None)
    assert unscored.confidences is None and _debug_run(unscored, None, demo, None) == (None, NO_SCORES)
    assert app._debug_of(unscored) == (None, NO_SCORES) and app._debug_of(None) == (None, NO_RUN)
    broken = playground._annotations("not the scored text", outcome.display, outcome.display, None,
                                                     scores, demo.tokenizer)  # fmt: skip
    assert broken.confidences is None and broken.debug_note.startswith("No confidences for this answer: ")


@pytest.mark.slow
def test_manager_unloads_the_least_recently_used_model_when_memory_is_short(taught_model_dir, tmp_path):
    (tmp_path / "r.json").write_text(
        json.dumps(
            {
                "models": [
                    {"name": "first", "source": str(taught_model_dir)},
                    {"name": "second", "source": str(taught_model_dir)},
                ]
            }
        )
    )
    models = registry.build(str(tmp_path / "no-demo"), str(tmp_path / "r.json"))
    free = {"bytes": 1 << 40}
    manager = ModelManager(models, memory=lambda: free["bytes"])
    seen = []
    manager.get("first", progress=lambda fraction, message: seen.append((fraction, message)))
    assert manager.loaded == ["first"] and "ready" in manager.status("first")
    assert seen and all(0 <= f <= 1 for f, _ in seen)
    free["bytes"] = 0
    assert manager.get("second").entry.name == "second"
    assert manager.loaded == ["second"] and manager.status("first").startswith("Loads on first use")
    with pytest.raises(ModelUnavailable, match="demo: .*no-demo"):
        manager.get("demo")
    assert manager.status("demo").startswith("⚠️ Cannot load") and manager.loaded == ["second"]


def test_photos_are_offered_with_real_checkpoints_and_every_example_image_has_its_source():
    examples = prompts.load_examples(EXAMPLES_DIR)
    photos = {ex.image for ex in examples if ex.image.endswith(".jpg")}
    assert photos and all(registry.DEMO_NAME in ex.not_for for ex in examples if ex.image in photos)
    demo = {ex.image for ex in prompts.examples_for(registry.DEMO_NAME, examples)}
    assert demo and not demo & photos  # the demo model never saw a photo
    assert photos <= {ex.image for ex in prompts.examples_for("google/paligemma2-3b-mix-224", examples)}
    credits = (Path(EXAMPLES_DIR) / "CREDITS.md").read_text()
    files = {name for name in os.listdir(EXAMPLES_DIR) if name.endswith((".png", ".jpg"))}
    assert files == {os.path.basename(ex.image) for ex in examples}  # no image the gallery does not show
    assert all(f"`{name}`" in credits for name in files)  # each with where it comes from
