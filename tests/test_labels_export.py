"""Exported data keeps the model's labels, identically in the app's JSON, the CLI's JSON and COCO results;
distinct, readable names ("cat 2", "object") are for what a person looks at only. And the page's run gives the
highlighted text and the annotated image their labels' colours, which the API's plain values do not carry."""

import json
import os

import gradio as gr
import numpy as np
import pytest
from app_fixtures import DEMO_DIR
from PIL import Image

import paligemma
import postprocess
from paligemma.__main__ import main
from paligemma.generate import TokenScores
from playground.requests import Outcome, Playground, _highlighted, toggle_overlay

# Two cats and an object without a label, as a model may write them.
TEXT = (
    "<loc0100><loc0100><loc0400><loc0400> cat ; <loc0500><loc0500><loc0900><loc0900> cat ; "
    "<loc0200><loc0600><loc0300><loc0700>"
)
MODEL_LABELS = ["cat", "cat", ""]
DISPLAY_NAMES = ["cat", "cat 2", "object"]


@pytest.fixture
def playground():
    return Playground(manager=None)


def _app_outputs(playground, size, display_side=1024):
    picture = Image.new("RGB", size, (90, 90, 90))
    display = picture.copy()
    display.thumbnail((display_side, display_side))
    outcome = playground._annotations(TEXT, picture, display, masks=None)
    with open(outcome.detections, encoding="utf-8") as f:
        return outcome.annotated, json.load(f), outcome.drawn


@pytest.mark.parametrize("size", [(300, 200), (2000, 1200)])  # shown as it is / shown shrunk
def test_the_apps_json_keeps_the_models_labels_and_the_page_names_each_object(playground, size):
    annotated, exported, drawn = _app_outputs(playground, size)
    assert [obj["label"] for obj in exported["objects"]] == MODEL_LABELS
    assert (exported["width"], exported["height"]) == size
    assert [label for _, label in annotated[1]] == DISPLAY_NAMES
    assert Image.open(drawn).size == size


def test_app_cli_and_coco_export_agree_on_the_labels(playground, tmp_path, monkeypatch, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (300, 200)).save(image)

    tokenizer = paligemma.Tokenizer(os.path.join(DEMO_DIR, "tokenizer.model"))

    class Answering:  # a model that writes TEXT, so the CLI's JSON can be compared with the app's
        mask_decoder_path = None
        mask_decoder_note = None
        dtype_note = None  # loaded in the default dtype
        cpu_form = None  # not measured (a small model, as load leaves it)

        def __init__(self):
            self.tokenizer = tokenizer

        def run(self, *args, **kwargs):
            ids = tokenizer.encode(TEXT)
            sure = TokenScores(
                ids,
                np.zeros(len(ids), np.float32),
                np.zeros((len(ids), 1), np.int32),
                np.zeros((len(ids), 1), np.float32),
            )
            yield paligemma.Result([TEXT], [ids], paligemma.Timing(new_tokens=len(ids)), [sure])

    monkeypatch.setattr(paligemma, "load", lambda *args, **kwargs: Answering())
    assert main(["predict", "--image", str(image), "--prompt", "detect cat", "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)["objects"]
    from_app = _app_outputs(playground, (300, 200))[1]["objects"]
    shared = ("label", "box", "mask")  # the CLI also scores each object
    assert [{k: o[k] for k in shared} for o in from_cli] == [{k: o[k] for k in shared} for o in from_app]

    coco = postprocess.to_coco_results([(7, postprocess.parse(TEXT, 300, 200))])
    assert [result["category_id"] for result in coco] == [1, 1, 2]  # both cats are one category


def test_unlabelled_objects_get_a_readable_name_and_no_raw_tokens_are_shown():
    text = "<loc0100><loc0100><loc0400><loc0400> ; <loc0500><loc0500><loc0900><loc0900>"
    pieces = postprocess.parse(text, 224, 224)
    assert [obj.label for obj in postprocess.objects(pieces)] == ["", ""]  # the data: no label
    assert [obj.label for obj in postprocess.objects(postprocess.display_labels(pieces))] == ["object", "object 2"]
    assert _highlighted(text, Image.new("RGB", (224, 224))) == [("object", "object"), ("object 2", "object 2")]


def test_the_page_gets_each_labels_colour_and_the_api_plain_values(playground, monkeypatch):
    image = Image.new("RGB", (224, 224))
    pieces = postprocess.display_labels(postprocess.parse(TEXT, 224, 224))
    colors = {"cat": "#e6194b", "cat 2": "#3cb44b", "object": "#ffffff"}
    steps = [
        Outcome([postprocess.Text("I see ")], "I see ", {}),
        Outcome(
            pieces,
            TEXT,
            {"postprocess_s": 0.0},
            annotated=(image, []),
            colors=colors,
            detections="d.json",
            drawn="a.png",
        ),
    ]
    monkeypatch.setattr(Playground, "outcomes", lambda self, *args: (step for step in steps))
    streamed, final = list(playground.run_on_page(None, "detect cat", "demo", "greedy", 8))

    status, highlighted, annotated, raw, detections, drawn, *_ = streamed
    assert isinstance(highlighted, gr.HighlightedText) and not highlighted.color_map
    assert annotated is None and raw == "I see "  # no picture while it streams, and no empty download panels
    assert detections == gr.update(value=None, visible=False) and drawn == gr.update(value=None, visible=False)
    assert status == "Running…"
    status, highlighted, annotated, raw, detections, drawn, *_ = final
    assert isinstance(highlighted, gr.HighlightedText) and isinstance(annotated, gr.AnnotatedImage)
    assert highlighted.color_map == annotated.color_map == colors  # the colours picked on the picture
    assert raw == TEXT
    assert detections == gr.update(value="d.json", visible=True) and drawn == gr.update(value="a.png", visible=True)
    assert steps[1].plain()[0] == [("cat", "cat"), ("cat 2", "cat 2"), ("object", "object")]  # the API: plain values


def test_a_legend_click_hides_its_overlay_and_a_second_click_shows_it(playground):
    picture = Image.new("RGB", (224, 224), (90, 90, 90))
    outcome = playground._annotations(TEXT, picture, picture, masks=None)
    click = gr.SelectData(None, {"index": 1, "value": "cat 2"})

    annotated, hidden = toggle_overlay(outcome, click)
    assert hidden.hidden == {"cat 2"} and [a["label"] for a in annotated.value["annotations"]] == DISPLAY_NAMES
    assert [_drawn(annotated, i) for i in range(3)] == [True, False, True]  # its legend entry stays
    annotated_again, shown_again = toggle_overlay(hidden, click)
    assert shown_again.hidden == frozenset() and [_drawn(annotated_again, i) for i in range(3)] == [True] * 3
    assert annotated.color_map == annotated_again.color_map == outcome.colors


def _drawn(annotated, index):
    """Whether overlay `index` of a gr.AnnotatedImage shows anything."""
    overlay = Image.open(annotated.value["annotations"][index]["image"]["path"]).convert("RGBA")
    return bool(np.asarray(overlay)[..., 3].any())
