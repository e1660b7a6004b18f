"""Headless Chromium for the UI tests: Debian's `chromium` (make test installs it) driven by Playwright, never
`playwright install`. Every request not to 127.0.0.1 is refused (the Prefect and MLflow UIs try analytics calls
even offline) and listed, and screenshots go to tests/artifacts/ (ignored by git) for a person to look at."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

from local_stack import ROOT

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def local_page(width: int = 1400, height: int = 1000):
    """A page of a fresh headless Chromium (Playwright gives it a temporary profile); yields (page, blocked), the
    second the URLs it refused."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: `apt-get install -y --no-install-recommends chromium` "
                    "(make test does it)")
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []

    def only_local(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            return route.continue_()
        blocked.append(route.request.url)
        return route.abort()

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.route("**/*", only_local)
            yield context.new_page(), blocked
        finally:
            browser.close()
