"""The "Debug this answer" panel: its handlers called directly on a fixed synthetic run, and (slow) the panel
mounted in a tiny page driven by Chromium: the slider hides a box, the model's eye and the token inspector
render, a clicked row highlights its object, and ground truth draws a match with its IoU and a dashed miss.
"""

import json
import os
import socket
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from browser import ARTIFACTS, CHROMIUM, chromium
from PIL import Image, ImageColor, ImageDraw

import paligemma
from paligemma import TokenScores
from playground.debug_panel import (
    NO_RUN,
    TRUTH_HINT,
    DebugPanel,
    boxes_picture,
    build_debug_panel,
    comparison_view,
    debug_run,
    eye_view,
    selected_object,
    shown_objects,
    token_table,
    update,
)
from postprocess import format_object, join_objects
from postprocess.ground_truth import STYLES

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets" / "demo" / "tokenizer.model"
W, H = 320, 240
GREY = (90, 90, 90)
SURE, UNSURE = 0.9, 0.3  # token probabilities of the two objects: scores 0.81 and 0.09
CIRCLE_BINS, SQUARE_BINS = (200, 100, 500, 400), (600, 600, 900, 950)  # y1 x1 y2 x2


def _picture():
    image = Image.new("RGB", (W, H), GREY)
    pen = ImageDraw.Draw(image)
    pen.ellipse((40, 55, 115, 110), fill=(220, 40, 40))
    pen.rectangle((195, 150, 290, 205), fill=(40, 70, 220))
    return image


def _synthetic_run():
    tok = paligemma.Tokenizer(str(TOKENIZER))
    loc = tok.loc_ids
    circle = [*(loc[b] for b in CIRCLE_BINS), *tok.encode(" red circle")]
    square = [*(loc[b] for b in SQUARE_BINS), *tok.encode(" square")]
    separator = tok.encode(" ;")
    ids = [*circle, *separator, *square]
    probs = [SURE] * (len(circle) + len(separator)) + [UNSURE] * len(square)
    top_ids, top_probs = [], []
    for token, prob in zip(ids, probs):
        near = loc[min(loc.index(token) + 40, 1023)] if token in loc else tok.eos_id
        top_ids.append([token, near, tok.eos_id + 1, tok.eos_id + 2, tok.eos_id + 3])
        rest = (1 - prob) * 0.9
        top_probs.append([prob, rest, (1 - prob - rest) / 3, (1 - prob - rest) / 3, (1 - prob - rest) / 3])
    scores = TokenScores(
        ids,
        np.log(np.asarray(probs, np.float32)),
        np.asarray(top_ids, np.int32),
        np.log(np.asarray(top_probs, np.float32)),
    )
    return debug_run(
        _picture(), tok.decode(ids), scores, tok, image_size=224, patch_size=14, image_name="/tmp/uploads/shapes.png"
    )


@pytest.fixture(scope="module")
def run():
    return _synthetic_run()


def _box(run, index):
    return run.objects[index].box


def _edge_pixel(run, index):
    x1, y1, x2, y2 = _box(run, index)
    return (y1 + y2) // 2, x1  # (row, column) on the left edge


def _truth_text(run):
    """The circle where the model put it (a match) and a triangle it did not find (a miss)."""
    return join_objects(
        [format_object("red circle", _box(run, 0), W, H), format_object("triangle", (130, 150, 180, 200), W, H)]
    )


def test_the_run_holds_objects_scores_and_rows(run):
    assert run.labels == ["red circle", "square"]
    assert [round(c["score"], 3) for c in run.confidences] == [round(SURE**2, 3), round(UNSURE**2, 3)]  # box × label
    assert shown_objects(run, 0.0) == [0, 1] and shown_objects(run, 0.5) == [0]
    assert len(run.rows) == len(token_table(run))
    assert {row.object_index for row in run.rows} == {0, 1}
    assert set(run.colors) == {"red circle", "square"}


def test_scores_given_as_a_mapping_and_confidences_as_dicts(run):
    tok = paligemma.Tokenizer(str(TOKENIZER))
    ids = [row.token_id for row in run.rows]
    scores = {
        "token_ids": ids,
        "logprobs": np.log([row.prob for row in run.rows]),
        "top_ids": np.asarray([[row.token_id] for row in run.rows]),
        "top_logprobs": np.zeros((len(ids), 1)),
    }
    again = debug_run(
        run.image,
        run.text,
        scores,
        tok,
        224,
        14,
        confidences=run.confidences,
        colors={"red circle": "#ffffff", "square": "#000000"},
    )
    assert again.confidences == run.confidences and again.colors["square"] == "#000000"
    with pytest.raises(ValueError, match="one confidence per object"):
        debug_run(run.image, run.text, scores, tok, 224, 14, confidences=run.confidences[:1])


def test_the_slider_hides_the_unsure_box_and_a_selection_brings_it_back_highlighted(run):
    row, col = _edge_pixel(run, 1)
    square = ImageColor.getrgb(run.colors["square"])
    assert tuple(np.asarray(boxes_picture(run, 0.0))[row, col]) == square
    hidden = np.asarray(boxes_picture(run, 0.5))
    assert tuple(hidden[row, col]) == tuple(np.asarray(run.image)[row, col])
    selected = np.asarray(boxes_picture(run, 0.5, selected=1)).astype(int)
    assert tuple(selected[row, col]) == square
    assert (selected[5, 5] < np.asarray(run.image)[5, 5]).all()  # the rest is dimmed


def test_edge_bands_add_the_alternative_bins(run):
    x1, y1, x2, y2 = _box(run, 0)
    near_row = round((CIRCLE_BINS[0] + 40) / 1024 * H)  # the top edge's runner-up bin, 40 bins lower
    column = (x1 + x2) // 2
    plain, banded = (np.asarray(boxes_picture(run, 0.0, bands)).astype(int) for bands in (False, True))
    assert np.abs(plain[near_row, column] - banded[near_row, column]).max() > 10
    assert (plain[H - 5, 5] == banded[H - 5, 5]).all()


def test_model_eye_and_its_note(run):
    eye, note = eye_view(run)
    assert eye.size == (448, 448)
    assert "320×240" in note and "16×16 patches" in note


def test_selecting_a_row_names_its_object(run):
    rows = run.rows
    square_row = next(i for i, r in enumerate(rows) if r.object_index == 1)
    assert selected_object(run, gr.SelectData(None, {"index": [square_row, 1], "value": ""})) == 1
    assert selected_object(run, gr.SelectData(None, {"index": [0, 0], "value": ""})) == 0
    assert selected_object(run, gr.SelectData(None, {"index": [len(rows) + 3, 0], "value": ""})) is None
    assert selected_object(None, gr.SelectData(None, {"index": [0, 0], "value": ""})) is None
    sorted_table = {"index": [0, 1], "value": "", "row_value": token_table(run)[square_row]}  # sorted in the browser
    assert selected_object(run, gr.SelectData(None, sorted_table)) == 1


def test_ground_truth_from_text_or_file(run, tmp_path):
    picture, note = comparison_view(run, 0.0, _truth_text(run), None)
    assert "precision 0.50 (1 of 2 boxes right), recall 0.50 (1 of 2 found)" in note
    assert "match: red circle IoU 1.00" in note and "missed: triangle" in note and "false box: square" in note
    assert picture.size[0] == W and picture.size[1] > H
    _, at_half = comparison_view(run, 0.5, _truth_text(run), None)
    assert "precision 1.00 (1 of 1 boxes right)" in at_half  # the hidden square is not counted
    path = tmp_path / "truth.json"
    path.write_text(json.dumps([{"bbox": [130, 150, 50, 50], "category": "triangle"}]))
    _, from_file = comparison_view(run, 0.0, "ignored when a file is given", str(path))
    assert "0 of 2 boxes right" in from_file and "missed: triangle" in from_file
    assert comparison_view(run, 0.0, "", None) == (None, TRUTH_HINT)
    picture, problem = comparison_view(run, 0.0, "cats everywhere", None)
    assert picture is None and problem.startswith("⚠️") and "no <locNNNN> tokens" in problem
    path.write_bytes(b"\xff\xfe\x00bad")
    assert "not UTF-8" in comparison_view(run, 0.0, "", str(path))[1]


def test_update_gives_every_output(run):
    outputs = update(run, 0.5, True, None, _truth_text(run), None)
    boxes, eye, eye_note, table, comparison, comparison_note = outputs
    assert boxes.size == (W, H) and eye.size == (448, 448) and "320×240" in eye_note
    assert len(table) == len(run.rows) and comparison is not None and "IoU" in comparison_note
    assert update(None, 0.0, False, None, "", None) == (None, None, "", [], None, "")
    assert boxes_picture(None, 0.5, True) is None  # the slider moved before any run


def test_the_panel_builds_inside_blocks():
    with gr.Blocks() as demo:
        panel = build_debug_panel()
        load = gr.Button("Load")
        panel.follow(load.click(lambda: None, None, panel.run))
    assert isinstance(panel, DebugPanel)
    assert panel.note.value == NO_RUN  # an empty panel says why, until a run replaces it
    assert len(panel.inputs) == 6 and len(panel.outputs) == 6
    assert isinstance(panel.tokens, gr.Dataframe) and isinstance(panel.threshold, gr.Slider)
    assert panel.update is update
    assert len(demo.fns) >= 6  # the panel's own events and the follow-up of the load


# ---- in a browser -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shown_image(page, elem_id):
    """The PNG the browser shows in #elem_id, fetched from the page's own URL, as an array."""
    import io

    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")).astype(int)


def _wait_for_new_image(page, elem_id, old_src, timeout=20_000):
    page.wait_for_function(
        "([id, old]) => { const img = document.querySelector(`#${id} img`); "
        "return img && img.src !== old && img.complete && img.naturalWidth > 0; }",
        arg=[elem_id, old_src],
        timeout=timeout,
    )


@pytest.mark.slow
def test_panel_in_a_browser(run):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with gr.Blocks() as demo:
        load = gr.Button("Load run", elem_id="load")
        panel = build_debug_panel()
        panel.follow(load.click(lambda: _synthetic_run(), None, panel.run))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with chromium(1280, 1400) as browser:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text("Debug this answer").click()
            page.locator("#load").click()
            page.wait_for_function(
                "() => { const img = document.querySelector('#debug-boxes img'); "
                "return img && img.complete && img.naturalWidth > 0; }",
                timeout=30_000,
            )
            sync_api.expect(page.locator("#debug-tokens")).to_contain_text("y1: bin 200", timeout=10_000)
            sync_api.expect(page.locator("#debug-eye-note")).to_contain_text("16×16 patches")
            assert page.locator("#debug-eye img").evaluate("img => img.naturalWidth") == 448  # the model's eye

            row, col = _edge_pixel(run, 1)
            square = ImageColor.getrgb(run.colors["square"])
            assert tuple(_shown_image(page, "debug-boxes")[row, col]) == square
            old = page.locator("#debug-boxes img").get_attribute("src")
            number = page.locator("#debug-threshold input[type=number]")
            number.fill("0.5")
            number.blur()  # the number box sends "release" when it loses focus
            _wait_for_new_image(page, "debug-boxes", old)
            assert tuple(_shown_image(page, "debug-boxes")[row, col]) == GREY  # the slider hid the square

            old = page.locator("#debug-boxes img").get_attribute("src")
            page.locator("#debug-tokens").get_by_text("2 square").first.click()  # a token of the hidden square
            _wait_for_new_image(page, "debug-boxes", old)
            highlighted = _shown_image(page, "debug-boxes")
            assert tuple(highlighted[row, col]) == square and (highlighted[5, 5] < GREY).all()

            page.locator("#debug-truth textarea").fill(_truth_text(run))
            sync_api.expect(page.locator("#debug-comparison-note")).to_contain_text("IoU 1.00", timeout=10_000)
            page.wait_for_function(
                "() => { const img = document.querySelector('#debug-comparison img'); "
                "return img && img.complete && img.naturalWidth > 0; }",
                timeout=10_000,
            )
            compared = _shown_image(page, "debug-comparison")
            x1, y1, x2, y2 = _box(run, 0)
            match = np.array(ImageColor.getrgb(STYLES["match"]))
            assert (compared[y1 + 20 : y2 - 5, x1] == match).all()  # the match: solid
            miss = np.array(ImageColor.getrgb(STYLES["miss"]))
            miss_edge = (compared[165:195, 130] == miss).all(axis=1)  # the triangle's left edge
            assert 0.2 < miss_edge.mean() < 0.8  # the miss: dashed, in its own colour
            os.makedirs(ARTIFACTS, exist_ok=True)
            page.locator("#debug-panel").screenshot(path=os.path.join(ARTIFACTS, "debug-panel.png"))
            page.screenshot(path=os.path.join(ARTIFACTS, "debug-panel-page.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
