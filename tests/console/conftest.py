"""Browser tests of the administrator's console: Debian's Chromium, driven by Playwright for
Python through ``executable_path`` (Playwright's own browser download cannot work here), against
real node processes on the suite's real PostgreSQL.

``make test`` installs Chromium first (``hack/install-chromium.sh``); without it these tests are
skipped with one loud reason, and with ``CI=true`` they fail instead. Screenshots of every page
a test visits are kept under ``test-artifacts/console/`` (``DSM_TEST_ARTIFACTS`` moves it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.console.helpers import LONG
from tests.support.nodes import REPO

CHROMIUM = os.environ.get("DSM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("DSM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "console"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


# Package scope, not session: Playwright's sync API keeps an event loop running in the main
# thread while it is open, and every asyncio test collected after this package would fail with
# "Runner.run() cannot be called from a running event loop". It stops when the package ends.
@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        message = (
            f"CONSOLE BROWSER TESTS SKIPPED: no Chromium at {CHROMIUM}; `make test` installs it "
            "(hack/install-chromium.sh), or set DSM_CHROMIUM"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    # Every wait is judged by what the page shows; the bound only ends a test that is failing.
    # Playwright's default (5 s for an assertion) is a timed assertion on a busy machine: a
    # sign-in (Argon2 on 2 shared cores) or a live refresh may take longer and still be right.
    expect.set_options(timeout=LONG)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    """This test's folder of screenshots."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:120]
    folder = ARTIFACTS / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile (no cookies) at desktop width; the nodes' certificate is the
    cluster's own, so certificate errors are ignored."""
    ctx = browser.new_context(
        ignore_https_errors=True, viewport=DESKTOP, locale="en-GB", timezone_id="UTC"
    )
    ctx.set_default_timeout(LONG)  # actions and navigations: a bound, not a measure
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    """A tab that fails its test if the browser reports a Content-Security-Policy violation (an
    inline script or style, an asset from elsewhere) or a script error."""
    p = context.new_page()
    problems: list[str] = []
    p.on(
        "console",
        lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
    )
    p.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    yield p
    assert not problems, "the browser reported:\n" + "\n".join(problems)
