"""The page in a real browser: Debian's Chromium driven by Playwright against `python app.py` on loopback.

Uploads the detect example, runs it, and checks the highlighted label and the box drawn in the annotated
image pixel by pixel: the overlay changes exactly the expected region, and the box's border has the label's
colour (blended at the overlay's opacity). Screenshots are saved under $TEST_ARTIFACTS (default
test-artifacts/).
"""

import os
import re

import numpy as np
import pytest
from app_fixtures import (
    TAUGHT,
    UNREACHABLE,
    UNREACHABLE_REPO,
    detect_example,
    write_registry,
)
from browser import ARTIFACTS, CHROMIUM, chromium
from PIL import Image

from playground.app_process import app_process

pytest.importorskip("playwright")
from playwright.sync_api import expect

SERVE_WITHIN_S = 60  # the README promises the page within a minute of `python app.py`
RESULT_TIMEOUT_MS = 90_000
MASK_OPACITY = 0.85  # gr.AnnotatedImage draws its overlays at this CSS opacity
SECRET = "hf_thisTokenMustNeverBeShown"

pytestmark = pytest.mark.slow

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(taught_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser_registry")
    log_path = str(folder / "server.log")
    with app_process(write_registry(folder, taught_model_dir), log_path, env={"HF_TOKEN": SECRET}) as (url, seconds):
        yield {"url": url, "seconds": seconds, "log": log_path}


@pytest.fixture(scope="module")
def browser():
    with chromium(1280, 1100) as context:
        yield context


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.goto(server["url"])
    page.get_by_role("button", name="Run").wait_for()
    yield page
    page.close()


def _save(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path, full_page=True)
    return path


def test_page_is_served_quickly_with_every_control(server, page):
    assert server["seconds"] < SERVE_WITHIN_S
    for task in ("caption", "describe", "OCR", "answer", "question", "detect", "segment"):
        expect(page.get_by_role("radio", name=task, exact=True)).to_be_visible()
    for label in ("Language", "Prompt", "Model", "Decoding"):
        expect(page.get_by_label(label, exact=True).first).to_be_visible()
    expect(page.get_by_role("button", name="Clear")).to_be_visible()
    expect(page.get_by_text("detect red circle", exact=True)).to_be_visible()  # the examples gallery
    page.get_by_role("radio", name="OCR", exact=True).check()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("ocr")
    expect(page.get_by_label("Language", exact=True)).to_be_hidden()  # OCR takes no language


@pytest.mark.parametrize("model, tolerance_px", [(TAUGHT, 2), ("demo", 8)])
def test_detect_example_shows_label_and_box(page, model, tolerance_px):
    example = detect_example()
    label = "red circle"
    truth = next(obj["box"] for obj in example.objects if obj["label"] == label)
    if model != TAUGHT:
        page.get_by_label("Model", exact=True).click()
        page.get_by_role("option", name=re.compile(f"^{model} · ")).click()  # each model with its size
    page.locator("#image input[type=file]").set_input_files(example.image)
    page.get_by_label("Prompt", exact=True).fill(example.prompt)
    page.get_by_role("button", name="Run").click()

    expect(page.locator("#timing-line")).to_contain_text("tokens", timeout=RESULT_TIMEOUT_MS)  # run finished
    _save(page, f"browser-detect-{model}.png")
    expect(page.locator("#output")).to_contain_text(label, timeout=1000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#annotated img')].length >= 2 && "
        "[...document.querySelectorAll('#annotated img')].every(img => img.complete && img.naturalWidth > 0)",
        timeout=RESULT_TIMEOUT_MS,
    )
    page.mouse.move(0, 0)  # hovering the picture would dim the overlay
    page.wait_for_function(  # the overlay fades in over 0.2 s: wait until every box is shown at its resting opacity
        "() => [...document.querySelectorAll('#annotated img.mask')].every(m => "
        f"Math.abs(parseFloat(getComputedStyle(m).opacity) - {MASK_OPACITY}) < 1e-3 && m.getAnimations().length === 0)",
        timeout=5000,
    )
    _save(page, f"browser-detect-{model}.png")  # again, now with the box

    with_box, without_box, scale = _overlay_screenshots(page)
    changed = np.abs(with_box.astype(int) - without_box.astype(int)).max(axis=2) > 8
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    assert rows.size and cols.size, "the annotated image shows no overlay"
    drawn = (np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]) + 1) / scale  # image pixels (+1: inset)
    assert np.abs(drawn - truth).max() <= tolerance_px + 1, (drawn, truth)

    color = np.array(_overlay_color(page))  # picked per box, for contrast with the pixels it crosses
    expected = MASK_OPACITY * color + (1 - MASK_OPACITY) * without_box
    border = _border_band(changed.shape, [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], scale)
    close = np.abs(with_box.astype(float) - expected).max(axis=2) < 16
    assert close[border].mean() > 0.9, f"only {close[border].mean():.0%} of the box border has the label colour"
    assert not changed[~_grown(changed.shape, [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], 2)].any()


def _overlay_color(page):
    """The colour of the first overlay, as the page draws it: one of its opaque pixels."""
    return page.locator("#annotated img.mask").first.evaluate(
        """img => { const canvas = document.createElement('canvas');
                    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
                    const context = canvas.getContext('2d'); context.drawImage(img, 0, 0);
                    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
                    for (let i = 0; i < data.length; i += 4) if (data[i + 3] > 250) return [...data.slice(i, i + 3)];
                    return null; }"""
    )


def _overlay_screenshots(page):
    """The annotated picture with and without its overlay, as uint8 arrays, and screen pixels per image pixel."""
    base = page.locator("#annotated img.base-image")
    base.scroll_into_view_if_needed()
    page.mouse.move(0, 0)  # hovering the picture would dim its overlay
    natural_width, natural_height, fit = base.evaluate(
        "img => [img.naturalWidth, img.naturalHeight, getComputedStyle(img).objectFit]"
    )
    element = base.bounding_box()
    scale = min(element["width"] / natural_width, element["height"] / natural_height)
    if fit != "contain":  # the picture fills its element
        assert abs(element["width"] / element["height"] - natural_width / natural_height) < 0.02, fit
    shown = {"width": natural_width * scale, "height": natural_height * scale}  # centred in the element
    shown["x"] = element["x"] + (element["width"] - shown["width"]) / 2
    shown["y"] = element["y"] + (element["height"] - shown["height"]) / 2
    with_box = np.asarray(Image.open(_shot(page, shown, "with")).convert("RGB"))
    page.evaluate(
        "document.querySelectorAll('#annotated img.mask').forEach(m => {"
        "m.style.transition = 'none'; m.style.display = 'none'; })"
    )
    for mask in page.locator("#annotated img.mask").all():
        expect(mask).to_be_hidden()
    without_box = np.asarray(Image.open(_shot(page, shown, "without")).convert("RGB"))
    return with_box, without_box, scale


def _shot(page, rect, name):
    """A screenshot of `rect`, 1 px inside it all round (its edge is anti-aliased); returns its path."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, f"browser-annotated-{name}.png")
    page.screenshot(
        path=path,
        clip={"x": rect["x"] + 1, "y": rect["y"] + 1, "width": rect["width"] - 2, "height": rect["height"] - 2},
    )
    return path


def _grown(shape, box, by):
    inside = np.zeros(shape, bool)
    x1, y1, x2, y2 = box
    inside[max(0, y1 - by) : y2 + by, max(0, x1 - by) : x2 + by] = True
    return inside


def _border_band(shape, box, scale):
    """Pixels surely inside the drawn border of `box` (3 image pixels wide): off its anti-aliased outer row
    and its corners."""
    x1, y1, x2, y2 = box
    a, b = 1, 1 + max(1, int(2 * scale))  # from a to b pixels inside the outer edge
    band = np.zeros(shape, bool)
    band[y1 + a : y1 + b, x1 + 2 * b : x2 - 2 * b] = True
    band[y2 - b : y2 - a, x1 + 2 * b : x2 - 2 * b] = True
    band[y1 + 2 * b : y2 - 2 * b, x1 + a : x1 + b] = True
    band[y1 + 2 * b : y2 - 2 * b, x2 - b : x2 - a] = True
    return band


def test_errors_show_in_the_page_and_the_token_stays_secret(page, server):
    page.get_by_role("button", name="Run").click()
    expect(page.get_by_text(re.compile("Upload an image first"))).to_be_visible(timeout=30_000)

    page.get_by_label("Model", exact=True).click()
    page.get_by_role("option", name=re.compile(f"^{UNREACHABLE} · ")).click()
    expect(page.locator("#model-info")).to_contain_text("cannot run on this server", timeout=60_000)
    expect(page.locator("#model-info")).to_contain_text(f"back on {TAUGHT}")  # the last model that worked
    expect(page.locator("#model-info")).to_contain_text(UNREACHABLE_REPO)
    expect(page.locator("#model input")).to_have_value(re.compile(f"^{TAUGHT} · "))
    _save(page, "browser-errors.png")
    assert "Traceback" not in page.content() and SECRET not in page.content()
    with open(server["log"]) as f:
        assert SECRET not in f.read()
