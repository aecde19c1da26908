"""The evaluation report's HTML opens in Chromium and shows the worst images, drawn and loaded."""

import os
from pathlib import Path

import pytest
from browser import ARTIFACTS, CHROMIUM, chromium

pytest.importorskip("playwright")

import paligemma
from paligemma.eval_report import write
from paligemma.evaluate import evaluate
from postprocess import format_object
from scenes.dataset import write_dataset
from scenes.tasks import TaskMix
from scenes.vqvae_train import load_vqvae

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"

pytestmark = pytest.mark.slow

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    """A small evaluation whose last line expects a box where there is none, so at least one image is worst."""
    folder = tmp_path_factory.mktemp("eval_page")
    write_dataset(
        folder,
        4,
        20261203,
        load_vqvae(DEMO),
        TaskMix(caption=0, detect=1, segment=1, count=0, colour=0, yes_no=0),
        valid_fraction=0.0,
    )
    wrong = format_object("red circle", (0, 0, 30, 30), 224, 224)
    with (folder / "train.jsonl").open("a") as f:
        f.write(f'{{"image": "images/000000.png", "prefix": "detect red circle", "suffix": "{wrong}"}}\n')
    report = evaluate(paligemma.load(str(DEMO)), folder / "train.jsonl", batch_size=4)
    _, page = write(report, folder / "out")
    return report, page


def test_report_shows_the_worst_images(report_page):
    report, page_path = report_page
    assert report.worst
    with chromium(1280, 900) as browser:
        page = browser.new_page()
        page.goto(Path(page_path).as_uri())
        page.get_by_role("heading", name="Worst images").wait_for()
        images = page.locator("img.worst")
        assert images.count() == len(report.worst)
        sizes = images.evaluate_all("els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
        assert all(complete and w >= 224 and h >= 224 for complete, w, h in sizes), sizes
        assert page.locator("figcaption", has_text="detect red circle").count() >= 1
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "eval_report.png"), full_page=True)
