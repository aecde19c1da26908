"""The app's Evaluate tab over the demo model, its handlers called directly: a zipped data set of synthetic scenes
gives the AP figures, the worst images and the report files; each bad upload gives one message; Stop gives a
partial report flagged as stopped. The last test drives the tab in Chromium."""

import json
import os
import re
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from browser import ARTIFACTS, CHROMIUM, chromium
from PIL import Image

from playground import registry
from playground.app_process import LOOPBACK, free_port
from playground.evaluate_tab import EvaluationRun, build_evaluate_tab
from playground.manager import ModelManager
from postprocess import format_object
from scenes.dataset import write_dataset
from scenes.tasks import TaskMix
from scenes.vqvae_train import load_vqvae

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
SCENES = 4  # and so 4 images: the tab below accepts at most that many
MIX = TaskMix(caption=1, detect=1, segment=1, count=0, colour=0, yes_no=0)
BATCH = 4


def _zip(path: Path, files: dict) -> str:
    """files: name in the zip -> bytes or text, or a Path to copy."""
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            if isinstance(content, Path):
                z.write(content, name)
            else:
                z.writestr(name, content)
    return str(path)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """4 scenes (caption, detect, segment lines), a line expecting a box where there is none (so one image is
    among the worst) and a line whose image is missing (skipped with its reason)."""
    folder = tmp_path_factory.mktemp("eval_tab_scenes")
    write_dataset(folder, SCENES, 20261204, load_vqvae(DEMO), MIX, valid_fraction=0.0)
    data = folder / "train.jsonl"
    wrong = format_object("red circle", (0, 0, 30, 30), 224, 224)
    with data.open("a") as f:
        f.write(json.dumps({"image": "images/000000.png", "prefix": "detect red circle", "suffix": wrong}) + "\n")
        f.write(json.dumps({"image": "images/gone.png", "prefix": "detect circle", "suffix": ""}) + "\n")
    lines = data.read_text().splitlines()
    return {"folder": folder, "lines": len(lines), "missing_line": len(lines)}


@pytest.fixture(scope="module")
def good_zip(scenes, tmp_path_factory):
    folder = scenes["folder"]
    files = {"set/data.jsonl": (folder / "train.jsonl").read_text()}
    files |= {f"set/{p.relative_to(folder).as_posix()}": p for p in sorted((folder / "images").glob("*.png"))}
    return _zip(tmp_path_factory.mktemp("eval_tab_zip") / "scenes.zip", files)


@pytest.fixture(scope="module")
def tab():
    """The tab built in a Blocks over a registry holding the demo model, at most SCENES images per zip."""
    manager = ModelManager(registry.build(str(DEMO)))
    with gr.Blocks() as blocks:
        built = build_evaluate_tab(manager, max_images=SCENES, batch_size=BATCH)
    built.blocks = blocks
    return built


@pytest.fixture(scope="module")
def good_run(tab, good_zip):
    run = EvaluationRun()
    assert tab.load_model(good_zip, "demo").startswith("Evaluating with")
    status, summary, worst, files = tab.evaluate(good_zip, "demo", run, progress=lambda *a, **k: None)
    return {"run": run, "status": status, "summary": summary, "worst": worst, "files": files}


def _report_json(files) -> dict:
    [path] = [p for p in files if p.endswith("report.json")]
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_the_tab_states_its_limits_and_offers_the_registry(tab):
    assert f"at most {SCENES} images" in tab.limits() and "at most 200 MiB" in tab.limits()
    assert ".jsonl" in tab.limits() and "COCO" in tab.limits()
    assert tab.model.choices == [("demo", "demo")] and tab.model.value == "demo"


@pytest.mark.slow
def test_a_good_zip_gives_the_ap_figures_the_worst_images_and_the_report(good_run, scenes):
    assert good_run["status"] == "Done."
    data = _report_json(good_run["files"])
    assert not data["stopped"] and data["evaluated"] == data["examples"] == scenes["lines"] - 1
    summary = good_run["summary"]
    boxes = next(line for line in summary.splitlines() if line.startswith("| boxes |"))
    detection = data["detection"]
    assert boxes.split(" | ")[1:5] == [f"{detection[k]:.3f}" for k in ("ap", "ap50", "ap75", "recall")]
    assert "| masks |" in summary and "| caption |" in summary and "images/s" in summary
    assert f"- line {scenes['missing_line']}: image not found: images/gone.png" in summary  # not the server's path
    shown = good_run["worst"].value
    assert [item["caption"].split(":")[0] for item in shown] == [f"line {w['line']}" for w in data["worst"]]
    assert any("detect red circle" in item["caption"] for item in shown)
    assert all(min(Image.open(item["image"]["path"]).size) >= 224 for item in shown)
    html = next(p for p in good_run["files"] if p.endswith("report.html"))
    assert "Worst images" in Path(html).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "files, message",
    [
        (None, "not a readable zip file"),
        ({"../evil.jsonl": "{}"}, "unsafe path '../evil.jsonl'"),
        ({f"{i}.png": b"png" for i in range(SCENES + 1)} | {"data.jsonl": "{}"}, f"at most {SCENES} are accepted"),
        ({"notes.txt": "hello"}, "no data file"),
        ({"data.jsonl": "{not json\n"}, "holds no example that can be evaluated"),
    ],
    ids=["not-a-zip", "path-traversal", "too-many-images", "no-data-file", "no-good-line"],
)
def test_each_bad_upload_gives_one_message(tab, tmp_path, files, message):
    upload = tmp_path / "upload.zip"
    if files is None:
        upload.write_text("this is no zip")
    else:
        _zip(upload, files)
    status, summary, worst, report = tab.evaluate(str(upload), "demo", EvaluationRun(), progress=lambda *a, **k: None)
    assert status.startswith("⚠️ ") and message in status and "Traceback" not in status
    assert (summary, worst, report) == ("", None, None)


def test_no_upload_or_an_unknown_model_is_refused_before_loading(tab, good_zip):
    with pytest.raises(gr.Error, match="Choose a .zip"):
        tab.load_model(None, "demo")
    with pytest.raises(gr.Error, match="unknown model 'nope'"):
        tab.load_model(good_zip, "nope")


@pytest.mark.slow
def test_stop_during_the_evaluation_gives_a_partial_report(tab, good_zip, scenes, good_run):
    run, said = EvaluationRun(), []

    def progress(value, **_):
        if isinstance(value, tuple) and value[0] > 0 and not said:
            said.append(tab.stop(run))  # as if Stop were pressed while the first batch ran

    status, summary, worst, files = tab.evaluate(good_zip, "demo", run, progress=progress)
    assert said == ["Stopping after the current batch; the report of the images done so far follows."]
    assert status.startswith("Stopped") and "stopped early" in summary
    data = _report_json(files)
    assert data["stopped"] is True and data["evaluated"] == BATCH < data["examples"] == scenes["lines"] - 1
    assert tab.stop(run) == "Nothing to stop." and tab.stop(good_run["run"]) == "Nothing to stop."


def test_stop_before_the_evaluation_begins(tab, good_zip):
    run = EvaluationRun()
    assert tab.stop(run) == "Stopped."
    assert tab.evaluate(good_zip, "demo", run) == ("Stopped before the evaluation began.", "", None, None)


@pytest.mark.slow
def test_the_tab_in_chromium_shows_the_summary_and_the_worst_images(tab, good_zip, good_run):
    pytest.importorskip("playwright")
    from playwright.sync_api import expect

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    demo = tab.blocks
    demo.queue()
    port = free_port()
    demo.launch(server_name=LOOPBACK, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with chromium(1280, 900) as browser:
            page = browser.new_page()
            page.goto(f"http://{LOOPBACK}:{port}/")
            page.locator("#eval-upload input[type=file]").set_input_files(good_zip)
            expect(page.locator("#eval-upload")).to_contain_text(
                re.compile(r"scenes\s*\.zip"), timeout=30_000
            )  # stem and extension are separate spans
            page.locator("#eval-start").click()
            summary = page.locator("#eval-summary")
            expect(summary).to_contain_text("AP50", timeout=240_000)
            expect(page.locator("#eval-status")).to_contain_text("Done.")
            expect(summary.locator("td").filter(has_text="boxes")).to_have_count(1)
            gallery = page.locator("#eval-worst")  # in preview: the first worst image, its caption, thumbnails
            expect(gallery).to_contain_text(good_run["worst"].value[0]["caption"], timeout=30_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#eval-worst img')].every("
                "i => i.complete && i.naturalWidth >= 224)"
            )
            sources = gallery.locator("img").evaluate_all("els => new Set(els.map(e => e.src)).size")
            assert sources == len(good_run["worst"].value)
            expect(page.locator("#eval-files")).to_contain_text("report.html")
            os.makedirs(ARTIFACTS, exist_ok=True)
            page.screenshot(path=os.path.join(ARTIFACTS, "evaluate_tab.png"), full_page=True)
    finally:
        demo.close()
