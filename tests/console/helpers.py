"""What the console's browser tests share: signing in, reading a page's numbers, screenshots."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from playwright.sync_api import Locator, Page, expect

from tests.support.nodes import REPO, Cluster, NodeProcess, set_settings

ADMIN_PASSWORD = "correct horse battery staple"
AUDITOR_PASSWORD = "auditor password, long enough"
# A node killed is Offline within seconds (the product's default is 3 minutes), yet a live node
# stalled beside Chromium on a loaded machine is not (its self-stop point is 2/3 of the threshold).
HEARTBEAT_SECONDS, OFFLINE_SECONDS = 1.0, 10.0
SCREENSHOTS = REPO / "docs" / "screenshots"
LONG = 60_000  # ms: the bound for anything that waits on the cluster (a failure, not a measure)


def start_nodes(cluster: Cluster, names: list[str], **env: str) -> list[NodeProcess]:
    """Nodes with the first administrator and a fast heartbeat, started one at a time."""
    set_settings(
        cluster.database_url,
        heartbeat_interval_seconds=HEARTBEAT_SECONDS,
        offline_threshold_seconds=OFFLINE_SECONDS,
    )
    return [cluster.start(n, DSM_ADMIN_PASSWORD=ADMIN_PASSWORD, **env) for n in names]


def create_auditor(node: NodeProcess, username: str = "audrey") -> str:
    status, body = node.request(
        "POST",
        "/api/users",
        {"username": username, "password": AUDITOR_PASSWORD, "role": "auditor"},
    )
    assert status == 201, body
    return username


def sign_in(page: Page, base: str, username: str = "admin", password: str = ADMIN_PASSWORD) -> None:
    page.goto(base + "/")
    expect(page).to_have_url(re.compile(r"/sign-in"))
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1, name="Manager Nodes")).to_be_visible()


def nav(page: Page, name: str) -> Locator:
    """A link of the main navigation."""
    return page.get_by_role("navigation", name="Main").get_by_role("link", name=name)


def status_cell(page: Page, node: str) -> Locator:
    return page.locator(f'#nodes-table tr[data-node="{node}"] [data-status]')


def served_by(page: Page) -> str:
    value = page.locator("[data-served-by]").first.get_attribute("data-served-by")
    assert value is not None
    return value


def shot(page: Page, folder: Path, name: str, readme: bool = False) -> Path:
    """A screenshot of the whole page into the test's artefacts; with ``readme`` and
    ``DSM_UPDATE_SCREENSHOTS=1`` also into ``docs/screenshots/`` (the README shows those)."""
    path = folder / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    if readme and os.environ.get("DSM_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / f"{name}.png")
    return path


def csrf_of(page: Page) -> str:
    token = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    assert token
    return token


def data(locator: Locator, *names: str) -> list[dict[str, Any]]:
    """The named data attributes of every element the locator finds, read in one go (a live
    refresh swapping the region cannot mix two versions of the page)."""
    result: list[dict[str, Any]] = locator.evaluate_all(
        """(els, names) => els.map(e =>
            Object.fromEntries(names.map(n => [n, e.getAttribute('data-' + n)])))""",
        list(names),
    )
    return result
