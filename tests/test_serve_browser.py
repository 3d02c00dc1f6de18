"""The web page of `qalign serve`, end to end in headless Chromium (playwright's sync API driving
the system's Chromium; no browser download).

CI needs Debian's Chromium: ``apt-get install -y --no-install-recommends chromium`` (plus
``pip install playwright``, never ``playwright install``). Without them this module skips and
says so. Set QALIGN_CHROMIUM to use a Chromium at another path.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from qalign.serve.app import BackgroundServer, Settings, create_app  # noqa: E402

expect = sync_api.expect

LEVELS = ("bad", "poor", "fair", "good", "excellent")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APT_HINT = "apt-get update && apt-get install -y --no-install-recommends chromium"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("QALIGN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip(f"no Chromium found (/usr/bin/chromium); on Debian/Ubuntu CI run: {APT_HINT}")
    with sync_api.sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        except Exception as exc:  # a Chromium that cannot start here (missing libraries, ...)
            pytest.skip(f"Chromium at {exe} did not start ({type(exc).__name__}: {str(exc)[:200]}); "
                        f"on Debian/Ubuntu CI run: {APT_HINT}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    settings = Settings(model=str(tiny_model_dir), device="cpu", max_items=8, max_queue=64)
    with BackgroundServer(create_app(settings)) as srv:
        # The page polls /readyz; a 503 while the model loads (slow on a busy machine) would show up
        # as a console error, so the browser only starts once the model is ready.
        deadline = time.monotonic() + 120
        while httpx.get(srv.url + "/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.2)
        yield srv


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    pg = context.new_page()
    problems: list[str] = []
    # console errors (CSP violations land here too); an HTTP error status is reported as
    # "Failed to load resource" and is checked by the tests that expect one
    pg.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource: the server "
                                                                           "responded with a status of 422")
          and problems.append(f"console: {m.text}"))
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    loopback = urlparse(server.url).netloc

    def only_loopback(route):
        url = urlparse(route.request.url)
        if url.scheme in ("http", "https") and url.netloc != loopback:
            problems.append(f"external request: {route.request.url}")
            return route.abort()
        return route.continue_()

    pg.route("**/*", only_loopback)
    pg.problems = problems
    yield pg
    context.close()


def api_score(server, path: str) -> dict:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/score", files=[("file", (Path(path).name, Path(path).read_bytes(), "image/png"))])
        assert r.status_code == 200
        return r.json()["results"][0]


def card_for(page, name: str):
    return page.locator(".card", has=page.locator(".name", has_text=name))


def check_card(card, expected: dict) -> None:
    assert card.locator(".score").inner_text() == f"{expected['score_1_5']:.2f}"
    assert card.locator(".level").inner_text() == expected["level"]
    widths = [card.locator(f".probs li[data-level={w}] .bar span").evaluate("e => parseFloat(e.style.width)")
              for w in LEVELS]
    assert widths == pytest.approx([100 * expected["probs"][w] for w in LEVELS], abs=0.06)
    assert sum(widths) == pytest.approx(100, abs=0.3)


def test_page_scores_dropped_and_chosen_images(page, server, image_paths, tmp_path):
    page.goto(server.url + "/")
    page.wait_for_selector("#status.ready", timeout=60_000)
    assert "ready" in page.locator("#status").inner_text()

    # 1. the file chooser
    chosen = image_paths[0]
    page.set_input_files("#files", chosen)
    page.wait_for_selector(".card.scored", timeout=30_000)
    check_card(card_for(page, Path(chosen).name), api_score(server, chosen))

    # 2. a real drop event on the drop zone (DataTransfer with two files, one of them not an image)
    dropped = image_paths[5]
    payload = base64.b64encode(Path(dropped).read_bytes()).decode()
    handle = page.evaluate_handle("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/png'}));
        dt.items.add(new File(['just text'], 'notes.txt', {type: 'text/plain'}));
        return dt;
    }""", [payload, "dropped.png"])
    page.dispatch_event("#drop", "drop", {"dataTransfer": handle})
    # (locator waits: the page's CSP forbids the eval behind wait_for_function, as it should)
    expect(page.locator(".card.scored")).to_have_count(2, timeout=30_000)
    expect(page.locator(".card.failed")).to_have_count(1, timeout=30_000)
    check_card(card_for(page, "dropped.png"), api_score(server, dropped))
    failed = card_for(page, "notes.txt")
    assert "not an image or video" in failed.locator(".error").inner_text()

    # 3. the screenshot shows the page with its results, not a blank canvas
    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert image.shape[0] >= 400 and image.shape[1] >= 1000
    assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 200
    box = card_for(page, "dropped.png").bounding_box()
    card = image[int(box["y"]): int(box["y"] + box["height"]), int(box["x"]): int(box["x"] + box["width"])]
    assert card.size and card.std() > 10  # the card region holds the thumbnail, text and bars
    # the bar of the most probable level is drawn in that level's colour
    level = card_for(page, "dropped.png").locator(".level").inner_text()
    colour = page.evaluate("w => getComputedStyle(document.querySelector('.bar .' + w)).backgroundColor", level)
    rgb = np.array([int(x) for x in colour[colour.index("(") + 1: colour.index(")")].split(",")[:3]])
    assert (np.abs(card - rgb).sum(axis=2) <= 6).sum() > 20, f"no {level} bar ({colour}) in the card"

    assert page.problems == [], page.problems


def test_page_shows_request_errors(page, server):
    page.goto(server.url + "/")
    page.wait_for_selector("#status.ready", timeout=60_000)
    files = [{"name": f"t{i}.txt", "mimeType": "text/plain", "buffer": b"x"} for i in range(2)]
    page.set_input_files("#files", files)
    expect(page.locator(".card.failed")).to_have_count(2, timeout=30_000)
    assert page.locator(".card.scored").count() == 0
    page.click("#clear")
    assert page.locator(".card").count() == 0
    assert page.problems == [], page.problems
