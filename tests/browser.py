"""Shared by the browser tests: Debian's Chromium with the flags it runs with here, and where screenshots go."""

import contextlib
import os
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = os.environ.get("TEST_ARTIFACTS", str(Path(__file__).resolve().parents[1] / "test-artifacts"))


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900):
    """A headless Chromium context with a fresh profile and a viewport of width × height, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            yield context
        finally:
            context.close()
