"""A Hub checkpoint picked in the page, as a visitor meets it: its download shows its progress with the file's
name, the mask decoder comes from the Space where it is published, and the model then draws a mask.

The Hub is the loopback stand-in (HF_ENDPOINT of the app process); its weights file drips out slowly so that
the progress is on screen long enough to be seen and photographed.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from app_fixtures import TAUGHT, detect_example
from browser import ARTIFACTS, chromium
from hub_stand_in import HubStandIn, publish_mask_decoder, taught_hf_files_fixture  # noqa: F401 - the fixture

from playground.app_process import app_process

pytest.importorskip("playwright")

REPO_ID = "org/taught-paligemma"
STANDIN = "standin"
NOTES = "the taught model as a Hub repo without vae-oid.npz"
SECONDS_PER_CHUNK = 0.4  # the stand-in's 64 KB chunks: a few seconds for the taught model's safetensors


@pytest.fixture(scope="module")
def hub_and_app(taught_model_dir, taught_hf_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("download_progress")
    registry = {
        "default": TAUGHT,
        "models": [
            {"name": TAUGHT, "source": str(taught_model_dir)},
            {"name": STANDIN, "source": REPO_ID, "notes": NOTES},
        ],
    }
    (folder / "models.json").write_text(json.dumps(registry))
    with HubStandIn() as hub:
        hub.add_repo(REPO_ID, taught_hf_files)
        publish_mask_decoder(hub, (taught_model_dir / "vae-oid.npz").read_bytes())
        hub.slow_file("model.safetensors", SECONDS_PER_CHUNK)
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_HUB_CACHE": str(folder / "hub"),
            "PALIGEMMA_BUCKET": hub.url + "/big_vision",
            "PALIGEMMA_CACHE": str(folder / "paligemma_cache"),
            "HF_TOKEN": "",
        }
        with app_process(str(folder / "models.json"), str(folder / "server.log"), env=env) as (url, _):
            yield hub, url


@pytest.mark.slow
@pytest.mark.parametrize("width, height, name", [(1400, 900, "desktop"), (390, 844, "phone")])
def test_a_hub_model_shows_its_download_then_draws_a_mask(hub_and_app, width, height, name):
    from playwright.sync_api import expect

    hub, url = hub_and_app
    os.makedirs(ARTIFACTS, exist_ok=True)
    with chromium(width, height) as browser:
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("button", name="Run").wait_for()
        picker = page.locator("#model input")
        expect(page.locator("#model-info")).to_contain_text("ready", timeout=60_000)  # the default model loaded
        picker.click()
        # Before anyone picks it, the picker says how big it is and that it fits (read from the stand-in's listing).
        option = page.get_by_role("option", name=re.compile(f"^{STANDIN} · "))
        expect(option).to_contain_text("fits", timeout=30_000)
        option.click()
        if name == "desktop":  # the first visit downloads; the second finds the files in the Hub cache
            progress = page.get_by_text(re.compile(r"downloading model\.safetensors: .* of "))
            expect(progress.first).to_be_visible(timeout=30_000)
            page.screenshot(path=os.path.join(ARTIFACTS, f"download-progress-{name}.png"), full_page=True)
        expect(page.locator("#model-info")).to_contain_text(NOTES, timeout=120_000)  # its own line, once loaded
        expect(page.locator("#model-info")).to_contain_text("ready (loaded in")
        expect(page.locator("#model-info")).not_to_contain_text("no masks")
        expect(picker).to_have_value(re.compile(f"^{STANDIN} · "))

        page.locator("#image input[type=file]").set_input_files(detect_example().image)
        page.get_by_label("Prompt", exact=True).fill("segment red circle")
        page.get_by_role("button", name="Run").click()
        expect(page.locator("#timing-line")).to_contain_text("tokens", timeout=120_000)  # the run finished
        expect(page.locator("#output")).to_contain_text("red circle")
        expect(page.locator("#annotated img.mask")).to_have_count(1)  # the mask layer over the picture
        page.locator("#result").scroll_into_view_if_needed()
        page.screenshot(path=os.path.join(ARTIFACTS, f"download-then-mask-{name}.png"), full_page=True)
    weights_gets = hub.gets_of("model.safetensors")
    assert weights_gets and weights_gets[0] is None  # one whole-file download, not resumed
