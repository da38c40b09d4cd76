"""The web page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
upload, ask, wait for the overlay, check the masks are drawn; keep a screenshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trained_model import MULTI_REGION_QUESTION

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def test_page_uploads_asks_and_draws_masks(browser, model_server, multi_region_image):
    image, predicted, _ = multi_region_image
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(model_server.url + "/")
    page.wait_for_selector('#status[data-state="ready"]', timeout=30_000)
    page.set_input_files("#file", str(image))
    page.fill("#question", MULTI_REGION_QUESTION)
    page.click("#ask")
    page.wait_for_selector('body[data-state="answered"]', timeout=120_000)

    # The answer, each region token highlighted in its mask's colour.
    assert page.inner_text("#answer") == predicted["answer"]
    tokens = page.eval_on_selector_all(".token[data-index]", "els => els.map(e => [e.textContent, getComputedStyle(e).backgroundColor])")
    assert [t for t, _ in tokens] == predicted["region_tokens"]
    assert len({colour for _, colour in tokens}) == len(tokens) >= 2

    # The overlay canvas really holds coloured mask pixels, one layer per region.
    overlay = page.evaluate(
        """() => { const c = document.getElementById('overlay-canvas');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let opaque = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) opaque++;
                   return {drawn: Number(c.dataset.masksDrawn), opaque, width: c.width}; }"""
    )
    assert overlay["drawn"] == len(predicted["regions"])
    assert overlay["opaque"] > 0
    rows = page.locator("#regions tr")
    assert rows.count() == len(predicted["regions"])
    assert page.locator('#regions a[download$=".png"]').count() == len(predicted["regions"])

    # Each mask can be toggled off and on.
    page.locator('input[data-toggle="0"]').uncheck()
    assert page.evaluate("Number(document.getElementById('overlay-canvas').dataset.masksDrawn)") == len(predicted["regions"]) - 1
    page.locator('input[data-toggle="0"]').check()

    page.mouse.move(0, 0)  # no hover focus: every mask at the same opacity in the screenshot
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
    assert not errors, errors
    assert all(url.startswith(model_server.url) or url.startswith("data:") for url in requests), "the page loaded something remote"
    page.close()
