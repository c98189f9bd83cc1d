"""The web page of `graft serve`, driven in Debian's headless Chromium through Playwright:
upload images, see a card per image with its top class and probability bars; on a server
with an API key, the page asks for the key and keeps it in the tab's session storage only.

Set GRAFT_SCREENSHOT_DIR to keep the screenshots (they go to the test's temp folder
otherwise)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from graft.serve import ServeSettings, create_app

KEY = "graft-browser-key-0123456789"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


pytestmark = pytest.mark.skipif(
    _chromium() is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)


def _start(app: Any) -> Iterator[str]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(trained_run: Path) -> Iterator[str]:
    yield from _start(create_app(trained_run, ServeSettings(max_files=4)))


@pytest.fixture(scope="module")
def locked_server(trained_run: Path) -> Iterator[str]:
    yield from _start(create_app(trained_run, ServeSettings(max_files=4), api_keys=[KEY]))


def _browser(p: Any) -> Any:
    return p.chromium.launch(
        executable_path=_chromium(),
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    )


def _shot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("GRAFT_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_upload_shows_bars_and_top_class(server: str, unseen_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert _chromium() is not None, "CI must install Debian's chromium"
    files = [sorted((unseen_dir / c).iterdir())[0] for c in ("circle", "square", "triangle")]
    files.append(tmp_path / "not-an-image.jpg")
    files[-1].write_text("hello")
    api = httpx.post(
        server + "/predict", files=[("file", (f.name, f.read_bytes())) for f in files]
    ).json()["predictions"]

    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server + "/")
        page.wait_for_selector("#report-link")  # the model description loaded
        page.set_input_files("#file", [str(f) for f in files])
        page.wait_for_function("document.querySelectorAll('.card').length === 4")
        page.wait_for_timeout(200)  # thumbnails decode
        shot = _shot_dir(tmp_path) / "serve-page.png"
        page.screenshot(path=str(shot), full_page=True)

        for expected in api:
            card = page.locator(f'.card[data-name="{expected["name"]}"]')
            if "error" in expected:
                assert "not an image" in card.locator(".error").inner_text()
                continue
            assert card.locator(".label").get_attribute("data-label") == expected["label"]
            rows = card.locator(".row")
            assert rows.count() == 3
            first = rows.nth(0)
            assert first.get_attribute("data-class") == expected["top"][0]["class"]
            width = first.locator(".bar").evaluate("b => b.getBoundingClientRect().width")
            track = first.locator(".track").evaluate("t => t.getBoundingClientRect().width")
            assert width == pytest.approx(track * expected["top"][0]["probability"], abs=2)
        assert "4 images classified" in page.inner_text("#status")
        assert page.locator("#report-link").get_attribute("href") == "/report"
        browser.close()

    image = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert image.shape[1] == 1100 and image.std() > 20  # a rendered page, not a blank one


def test_locked_server_asks_for_the_key_and_keeps_it_in_the_session(
    locked_server: str, unseen_dir: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    image = sorted((unseen_dir / "circle").iterdir())[0]
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(locked_server + "/")
        page.wait_for_selector("#key-form:not([hidden])")  # /model said 401: the key is asked
        page.fill("#key", "graft-browser-key-wrong-00000")
        page.click("#key-form button")
        page.wait_for_function("document.querySelector('#key-error').textContent.length > 0")
        assert "not valid" in page.inner_text("#key-error")
        assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept
        page.fill("#key", KEY)
        page.click("#key-form button")
        page.wait_for_selector("#report-link")  # the model description loaded with the key
        assert page.is_hidden("#key-form")
        assert page.evaluate("sessionStorage.getItem('graft-api-key')") == KEY
        assert page.evaluate("localStorage.length") == 0
        assert page.context.cookies() == []
        page.set_input_files("#file", [str(image)])
        page.wait_for_function("document.querySelectorAll('.card').length === 1")
        assert page.locator(".card .label").get_attribute("data-label")
        assert "1 image classified" in page.inner_text("#status")
        page.screenshot(path=str(_shot_dir(tmp_path) / "serve-page-key.png"), full_page=True)
        with page.expect_popup() as opened:  # a plain link cannot carry the key
            page.click("#report-link")
        report = opened.value
        report.wait_for_load_state()
        assert report.url.startswith("blob:") and "shapes" in report.content()
        browser.close()
