"""The real ComfyUI page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
load every workflow in workflows/, check no node type is missing, queue it from the page, check the
output, and keep a screenshot in artifacts/.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = [pytest.mark.browser, pytest.mark.server]


@pytest.fixture(scope="module")
def page(comfy_server, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    # A first visit would open the templates browser over the canvas; mark the tutorial as done.
    settings = comfy_server.base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
        pg = ctx.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(comfy_server.url, wait_until="domcontentloaded", timeout=120_000)
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        pg.page_errors = errors
        yield pg
        browser.close()


def _history_ids(server) -> set[str]:
    return set(server.get("/history").keys())


def _wait_new_prompt(server, before: set[str], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = _history_ids(server) - before
        if new:
            return server.wait(new.pop(), timeout=timeout)
        time.sleep(0.3)
    raise AssertionError(f"no prompt queued from the page finished within {timeout}s:\n{server.log_tail()}")


def test_pack_extension_is_loaded(page):
    names = page.evaluate("() => window.app.extensions.map(e => e.name)")
    assert "DiffuMatting.TransparentPreview" in names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_in_page(page, comfy_server, server_models, artifacts_dir, path):
    from fixtures_host import NO_FIXTURE, shrink_for_tiny

    # As shipped, with the tiny fixtures' size and step count and a LoRA of the family in the stack.
    workflow = shrink_for_tiny(json.loads(path.read_text()), server_models["workflow_loras"].get(path.stem))
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    missing = page.evaluate(
        "() => window.app.graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type])"
        ".map(n => n.type)")
    assert missing == [], f"{path.name}: node types missing in the page: {missing}"
    loaded = page.evaluate("() => window.app.graph._nodes.length")
    assert loaded == len(workflow["nodes"])

    before = _history_ids(comfy_server)
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    if path.stem in NO_FIXTURE:  # no fixture for its files here: the page must name the missing one
        page.wait_for_timeout(1500)
        errors = page.evaluate("() => JSON.stringify(window.app.lastNodeErrors || {})")
        assert NO_FIXTURE[path.stem] in errors, f"{path.name}: the page does not name the missing file: {errors}"
        page.screenshot(path=str(artifacts_dir / f"browser_{path.stem}.png"))
        return
    entry = _wait_new_prompt(comfy_server, before)
    files = comfy_server.output_files(entry)
    assert files and all(f.is_file() for f in files), f"{path.name}: no output written from the page"

    # Let the page receive the results and draw the previews, then keep a screenshot.
    page.wait_for_timeout(1500)
    page.evaluate("() => window.app.canvas.setDirty(true, true)")
    page.wait_for_timeout(500)
    shot = artifacts_dir / f"browser_{path.stem}.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    draws = page.evaluate(
        "() => window.app.extensions.find(e => e.name === 'DiffuMatting.TransparentPreview').checkerDraws")
    assert draws > 0, "the transparent preview was not drawn over a checkerboard"
    assert not page.page_errors, f"errors in the page: {page.page_errors}"
