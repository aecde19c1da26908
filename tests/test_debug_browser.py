"""The debug panel on the real page, in Chromium, against `python app.py` with the demo model.

A visitor clicks the "detect square" example, opens "Debug this answer" and sees the model's eye and the token
inspector, where a click on the square's token dims all but the square; raising the confidence slider past the
square's score takes the box off the annotated image (its legend entry too), lowering it brings it back; ground
truth pasted with the square and a triangle the model was not asked about shows one match with its IoU and one
miss, drawn dashed in the miss colour. Running the same prompt again live does not compile: the warm-up compiled
the scored variant every page run uses. At 1400×900 and 390×844; screenshots go to $TEST_ARTIFACTS
(test-artifacts/).
"""

import io
import json
import os
import re

import numpy as np
import pytest
from browser import ARTIFACTS, CHROMIUM, chromium
from PIL import Image, ImageColor

from playground import prompts
from playground.app_process import REPO, app_process
from playground.debug_panel import NO_RUN
from postprocess import format_object, join_objects
from postprocess.ground_truth import STYLES

pytest.importorskip("playwright")
from playwright.sync_api import expect

pytestmark = pytest.mark.slow

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)

EXAMPLES = prompts.examples_for("demo", prompts.load_examples(os.path.join(REPO, "assets", "examples")))
INDEX, EXAMPLE = next((i, ex) for i, ex in enumerate(EXAMPLES) if ex.prompt == "detect square")
SQUARE = next(o["box"] for o in EXAMPLE.objects if o["label"] == "blue square")
TRIANGLE = next(o["box"] for o in EXAMPLE.objects if o["label"] == "yellow triangle")
READY_MS = 240_000
RESULT_MS = 60_000
SCORED_TAG = re.compile(r"square (\d\.\d{3})")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("debug_browser")
    registry = folder / "models.json"
    registry.write_text(json.dumps({"default": "demo", "models": []}))
    with app_process(str(registry), str(folder / "server.log")) as (url, _):
        yield url


def _legend(page) -> list[str]:
    return page.locator("#annotated .legend-item").all_inner_texts()


def _set_threshold(page, value: float) -> None:
    number = page.locator("#debug-threshold input[type=number]")
    number.fill(f"{value:.3f}")
    number.blur()  # the number box sends "release" when it loses focus


def _image(page, elem_id):
    """The PNG the browser shows in #elem_id, fetched from the page's own URL, as an int array."""
    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")).astype(int)


def _loaded(page, elem_id, timeout=RESULT_MS):
    page.wait_for_function(
        "id => { const img = document.querySelector(`#${id} img`); "
        "return img && img.complete && img.naturalWidth > 0; }",
        arg=elem_id,
        timeout=timeout,
    )


def _debug_an_example(page, url, name):
    page.goto(url)
    expect(page.locator("#model-info")).to_contain_text("ready", timeout=READY_MS)
    page.locator("#examples .thumbnail-item").nth(INDEX).click()
    expect(page.locator("#timing-line")).to_contain_text("tokens", timeout=RESULT_MS)
    expect(page.locator("#annotated .legend-item")).to_have_count(1, timeout=RESULT_MS)
    [entry] = _legend(page)
    score = float(SCORED_TAG.search(entry).group(1))  # the box's tag carries its confidence

    page.get_by_text("Debug this answer").click()
    expect(page.locator("#debug-note")).not_to_contain_text(NO_RUN[:20])
    _loaded(page, "debug-eye")
    expect(page.locator("#debug-eye-note")).to_contain_text("patches")
    expect(page.locator("#debug-tokens")).to_contain_text("bin", timeout=10_000)  # loc tokens as bins
    expect(page.locator("#debug-tokens")).to_contain_text("square")
    _loaded(page, "debug-boxes")
    before = page.locator("#debug-boxes img").get_attribute("src")
    page.locator("#debug-tokens").get_by_text("y1: bin").filter(visible=True).first.click()  # the square's y1
    page.wait_for_function(
        "old => { const img = document.querySelector('#debug-boxes img'); return img && img.src !== old; }",
        arg=before,
        timeout=10_000,
    )
    _loaded(page, "debug-boxes")
    x1, y1, x2, y2 = SQUARE
    highlighted = _image(page, "debug-boxes")
    assert (highlighted[5, 5] < np.asarray(Image.open(EXAMPLE.image).convert("RGB"))[5, 5]).all()  # the rest dimmed

    _set_threshold(page, score + 0.001)  # just above the box's confidence: the box goes, legend entry and all
    expect(page.locator("#annotated .legend-item")).to_have_count(0, timeout=10_000)
    assert page.locator("#annotated img.mask").count() == 0
    page.locator("#annotated").scroll_into_view_if_needed()
    _save(page, f"debug-{name}-hidden.png")
    _set_threshold(page, score)  # at its confidence: it is back
    expect(page.locator("#annotated .legend-item")).to_have_count(1, timeout=10_000)

    truth = join_objects([format_object("square", SQUARE, 224, 224), format_object("triangle", TRIANGLE, 224, 224)])
    page.locator("#debug-truth textarea").fill(truth)
    note = page.locator("#debug-comparison-note")
    expect(note).to_contain_text(re.compile(r"match: square IoU 0\.\d\d|match: square IoU 1\.00"), timeout=10_000)
    expect(note).to_contain_text("missed: triangle")
    expect(note).to_contain_text("recall 0.50 (1 of 2 found)")
    _loaded(page, "debug-comparison")
    compared = _image(page, "debug-comparison")
    x1, y1, x2, y2 = TRIANGLE
    miss = np.array(ImageColor.getrgb(STYLES["miss"]))
    edge = (np.abs(compared[y1 + 5 : y2 - 5, x1] - miss).max(axis=1) < 40).mean()
    assert 0.2 < edge < 0.8, f"the missed triangle's left edge is {edge:.0%} miss colour: not dashed"
    page.locator("#debug-panel").scroll_into_view_if_needed()
    _save(page, f"debug-{name}.png", full_page=True)


def _save(page, file_name, full_page=False):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, file_name), full_page=full_page)


@pytest.mark.parametrize("size, name", [((1400, 900), "desktop"), ((390, 844), "phone")])
def test_debugging_an_example_on_the_page(server, size, name):
    with chromium(*size) as browser:
        page = browser.new_page()
        _debug_an_example(page, server, name)
        if name == "desktop":  # the same prompt run live: the warm-up compiled the scored variant it uses
            page.get_by_role("button", name="Run", exact=True).click()
            expect(page.locator("#status")).not_to_contain_text("Running", timeout=RESULT_MS)
            expect(page.locator("#timing-line")).to_contain_text("tokens")
            expect(page.locator("#timing-line")).not_to_contain_text("compiled")
            expect(page.locator("#annotated .legend-item")).to_have_count(1)
