"""The web page in a real headless Chromium (Debian's package, driven by Playwright).

Installs nothing: skipped when /usr/bin/chromium or the ``playwright`` package is missing
(``apt-get install chromium``; ``pip install playwright``; no ``playwright install`` needed).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import ServiceProcess, digit_png

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000


def _require_browser() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright Python package is missing (pip install playwright)")


def _is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("blob", "data"):  # blob:http://127.0.0.1:PORT/uuid stays in the page
        return parts.scheme == "data" or _is_loopback(parts.path)
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Browser:
    """A Chromium page plus every URL it requested and every console or page error it hit."""

    page: Any
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def record(self) -> None:
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text}")

    def outside_requests(self) -> list[str]:
        return [url for url in self.requests if not _is_loopback(url)]


@pytest.fixture(scope="module")
def browser(service: ServiceProcess) -> Iterator[Browser]:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = chromium.new_page(viewport={"width": 1100, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            session = Browser(page)
            session.record()
            yield session
        finally:
            chromium.close()


def _wait_until(page: Any, script: str, arg: Any = None, timeout_s: float = 60.0) -> None:
    """Poll ``script`` (a JS function) until it returns true.

    Playwright's ``wait_for_function`` evaluates a string in the page, which the page's
    Content-Security-Policy (no 'unsafe-eval') rightly refuses; ``evaluate`` is not affected.
    """
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(script, arg):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {script}")
        time.sleep(0.05)


def _model_option(page, name: str) -> str:
    """The value of the first ready option for model ``name`` in the model picker."""
    page.wait_for_selector("#model:not([disabled])")
    for option in page.locator("#model option").all():
        if option.inner_text().startswith(f"{name} v") and not option.is_disabled():
            return option.get_attribute("value")
    raise AssertionError(f"no ready option for {name!r}: {page.inner_text('#model')}")


def test_page_shows_top5_bars_and_the_gradcam_overlay(
    browser: Browser, service: ServiceProcess, tmp_path: Path
) -> None:
    page = browser.page
    image = digit_png(6, size=64)
    with service.client() as client:
        expected = client.post("/predict", files={"file": ("six.png", image, "image/png")})
        model = client.get("/models").json()["models"][0]["name"]
    assert expected.status_code == 200, expected.text
    expected_label = expected.json()["predictions"][0]["label"]

    page.goto(f"{service.url}/")
    assert page.title() == "Image classifier"
    page.select_option("#model", value=_model_option(page, model))
    page.set_input_files(
        "#file", files=[{"name": "six.png", "mimeType": "image/png", "buffer": image}]
    )

    _wait_until(page, "() => document.querySelectorAll('#bars .bar').length === 5")
    _wait_until(
        page,
        "() => { const img = document.getElementById('overlay');"
        " return img.complete && img.naturalWidth > 0 && img.src.startsWith('blob:'); }",
    )
    labels = page.locator("#bars .bar-label").all_inner_texts()
    values = page.locator("#bars .bar-value").all_inner_texts()
    assert len(labels) == 5
    assert all(label.strip() for label in labels)
    assert labels[0] == expected_label
    percents = [float(v.rstrip("%")) for v in values]
    assert percents == sorted(percents, reverse=True)
    assert page.locator("#bars .bar").first.get_attribute("aria-pressed") == "true"
    assert page.locator("#overlay").get_attribute("alt")
    assert page.locator("#error").is_hidden()
    assert page.evaluate("document.getElementById('overlay').naturalWidth") == 64

    screenshot = tmp_path / "web-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 0
    print(f"screenshot: {screenshot}")

    assert not browser.problems, browser.problems
    assert not browser.outside_requests(), browser.outside_requests()


def test_page_explains_another_class_on_click(browser: Browser) -> None:
    page = browser.page
    second = page.locator("#bars .bar").nth(1)
    before = page.evaluate("document.getElementById('overlay').src")
    second.click()
    _wait_until(
        page,
        "(before) => { const img = document.getElementById('overlay');"
        " return img.src !== before && img.complete && img.naturalWidth > 0; }",
        before,
    )
    assert second.get_attribute("aria-pressed") == "true"
    assert page.locator("#bars .bar").first.get_attribute("aria-pressed") == "false"
    assert not browser.problems, browser.problems


def test_page_shows_the_servers_error_detail(browser: Browser, service: ServiceProcess) -> None:
    page = browser.page
    page.set_input_files(
        "#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}]
    )
    error = page.locator("#error")
    error.wait_for(state="visible")
    text = error.inner_text()
    assert text.startswith("415")
    detail = httpx.post(
        f"{service.url}/topk", files={"file": ("notes.png", b"not an image", "image/png")}
    ).json()["detail"]
    assert detail in text
    assert not browser.outside_requests(), browser.outside_requests()


def test_static_assets_have_their_content_types(service: ServiceProcess) -> None:
    expected = {
        "/": "text/html",
        "/static/app.js": "text/javascript",
        "/static/style.css": "text/css",
    }
    for path, content_type in expected.items():
        response = httpx.get(f"{service.url}{path}", timeout=30)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(content_type), path
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert "http://" not in response.text.replace(service.url, "")
        assert "https://" not in response.text
    missing = httpx.get(f"{service.url}/static/../service/main.py", timeout=30)
    assert missing.status_code == 404
    assert httpx.get(f"{service.url}/static/nope.js", timeout=30).status_code == 404
