"""The real ComfyUI page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
load every workflow in workflows/, check no node type is missing, queue it from the page, check the
output and the checkerboard under the pack's transparent previews, in the classic canvas renderer and in
the Vue node renderer (Nodes 2.0), and keep screenshots in artifacts/.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = [pytest.mark.browser, pytest.mark.server]
PREVIEW_TYPES = ("DiffuMattingSaveRGBA", "DiffuMattingPreviewRGBA")  # the pack's output nodes (previews)
EXTENSION = "window.app.extensions.find(e => e.name === 'DiffuMatting.TransparentPreview')"
VUE_SETTING = "Comfy.VueNodes.Enabled"  # the frontend's Nodes 2.0 switch (frontend 1.32.9 has it too)


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
    from fixtures_host import check_writes_rgba_png, shrink_for_tiny

    # As shipped, with the tiny fixtures' size and step count and a LoRA of the family in the stack.
    workflow = shrink_for_tiny(json.loads(path.read_text()), server_models["workflow_loras"].get(path.stem))
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    missing = page.evaluate(
        "() => window.app.graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type])"
        ".map(n => n.type)")
    assert missing == [], f"{path.name}: node types missing in the page: {missing}"
    loaded = page.evaluate("() => window.app.graph._nodes.length")
    assert loaded == len(workflow["nodes"])

    page.evaluate(f"() => {{ const e = {EXTENSION}; e.checkerDraws = 0; e.drawnNodes.clear(); }}")
    entry = _queue_from_page(page, comfy_server)
    check_writes_rgba_png(comfy_server.output_files(entry), path.name)

    # Bring each of this workflow's preview nodes into view (the canvas loads and draws visible nodes only),
    # wait for its images and its checkerboard, then keep a screenshot.
    expected = [str(n["id"]) for n in workflow["nodes"] if n["type"] in PREVIEW_TYPES]
    for node_id in expected:
        page.evaluate("(id) => { const n = window.app.graph.getNodeById(Number(id)); window.app.canvas.centerOnNode(n);"
                      " window.app.canvas.setDirty(true, true); }", node_id)
        page.wait_for_function("(id) => { const n = window.app.graph.getNodeById(Number(id)); "
                               "return n?.imgs?.length && n.imgs.every(i => i.complete && i.naturalWidth); }",
                               arg=node_id, timeout=120_000)
        page.evaluate("() => window.app.canvas.setDirty(true, true)")
        page.wait_for_function(f"(id) => {EXTENSION}.drawnNodes.has(id)", arg=node_id, timeout=30_000)
    page.wait_for_timeout(300)
    shot = artifacts_dir / f"browser_{path.stem}.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    # This workflow's own previews: every pack output node that received images drew its checkerboard.
    previewed = page.evaluate("(types) => window.app.graph._nodes.filter(n => types.includes(n.type) && "
                              "n.imgs?.length).map(n => String(n.id))", list(PREVIEW_TYPES))
    drawn = page.evaluate(f"() => Array.from({EXTENSION}.drawnNodes)")
    assert sorted(previewed) == sorted(expected), f"{path.name}: previews shown {previewed}, nodes {expected}"
    assert sorted(drawn) == sorted(expected), f"{path.name}: checkerboard drawn under {drawn}, expected {expected}"
    assert not page.page_errors, f"errors in the page: {page.page_errors}"


def _queue_from_page(page, server) -> dict:
    before = _history_ids(server)
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    return _wait_new_prompt(server, before)


def _is_grey(px: np.ndarray, value: int) -> np.ndarray:
    return (np.abs(px.astype(int) - value) <= 4).all(axis=-1)


def test_vue_renderer_draws_checkerboard_under_transparent_preview(page, comfy_server, artifacts_dir):
    """Nodes 2.0: the Save Transparent PNG preview is an <img>; where the saved PNG is fully transparent the
    page shows the checkerboard's two greys, where it is opaque it shows the image, and the checkerboard
    covers the image itself, not the letterbox around it."""
    page.evaluate(f"async () => {{ await window.app.extensionManager.setting.set('{VUE_SETTING}', true); }}")
    try:
        assert page.evaluate(f"() => window.app.extensionManager.setting.get('{VUE_SETTING}')") is True
        workflow = json.loads((ROOT / "workflows" / "key_green_screen.json").read_text())
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        save_id = str(next(n["id"] for n in workflow["nodes"] if n["type"] == "DiffuMattingSaveRGBA"))
        entry = _queue_from_page(page, comfy_server)
        saved = [f for f in comfy_server.output_files(entry) if f.suffix == ".png"]
        assert len(saved) == 1
        img = page.locator(f'.lg-node[data-node-id="{save_id}"] img').first
        img.wait_for(state="visible", timeout=30_000)
        page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                               timeout=30_000)
        page.wait_for_timeout(500)
        info = img.evaluate("(el) => ({bg: getComputedStyle(el).backgroundImage, w: el.getBoundingClientRect().width, "
                            "h: el.getBoundingClientRect().height, nw: el.naturalWidth, nh: el.naturalHeight, "
                            "src: el.getAttribute('src')})")
        assert "conic-gradient" in info["bg"], info
        assert saved[0].name in info["src"]
        assert abs(info["w"] / info["h"] - info["nw"] / info["nh"]) < 0.02, f"checkerboard beyond the image: {info}"
        shot_path = artifacts_dir / "browser_vue_save_rgba.png"
        # nodes, and dialogs or toasts an earlier test's workflow left open, may cover the preview: hide them
        others = f'.lg-node:not([data-node-id="{save_id}"]), .p-dialog-mask, .p-dialog, .p-toast'
        page.evaluate(f"() => document.querySelectorAll('{others}').forEach(e => e.style.display = 'none')")
        img.screenshot(path=str(shot_path))
        page.evaluate(f"() => document.querySelectorAll('{others}').forEach(e => e.style.display = '')")
        shown = np.asarray(Image.open(shot_path).convert("RGB"))
        alpha = np.asarray(Image.open(saved[0]).convert("RGBA").resize(shown.shape[1::-1], Image.NEAREST))[..., 3]
        clear, solid = alpha == 0, alpha == 255
        assert clear.mean() > 0.2 and solid.mean() > 0.05, "the keyed sample has background and object"
        light, dark = _is_grey(shown, 0xCC), _is_grey(shown, 0x99)
        px = shown.astype(int)
        neutral = (np.abs(px[..., 0] - px[..., 1]) <= 4) & (np.abs(px[..., 1] - px[..., 2]) <= 4)
        checker = neutral & (px[..., 1] >= 0x99 - 4) & (px[..., 1] <= 0xCC + 4)  # the greys and their blends
        assert checker[clear].mean() > 0.9, "transparent pixels must show the checkerboard"
        assert light[clear].mean() > 0.2 and dark[clear].mean() > 0.2, "both checker greys"
        assert checker[solid].mean() < 0.5, "opaque pixels show the image, not the checkerboard"
        assert not page.page_errors, f"errors in the page: {page.page_errors}"
    finally:
        page.evaluate(f"async () => {{ await window.app.extensionManager.setting.set('{VUE_SETTING}', false); }}")


def test_filename_tokens_from_the_page(page, comfy_server, server_models):
    """%date:...% and %Node name.widget% in Save Transparent PNG's filename_prefix, queued from the page."""
    sample = server_models["green_sample"]
    graph = {"last_node_id": 2, "last_link_id": 1, "version": 0.4, "links": [[1, 1, 0, 2, 0, "IMAGE"]],
             "nodes": [
                 {"id": 1, "type": "LoadImage", "pos": [0, 0], "size": [300, 300], "mode": 0, "order": 0,
                  "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]},
                                            {"name": "MASK", "type": "MASK", "links": None}],
                  "properties": {"Node name for S&R": "LoadImage"}, "widgets_values": [sample, "image"]},
                 {"id": 2, "type": "DiffuMattingSaveRGBA", "pos": [400, 0], "size": [300, 300], "mode": 0,
                  "order": 1, "inputs": [{"name": "image", "type": "IMAGE", "link": 1}], "outputs": [],
                  "properties": {}, "widgets_values": ["tokens/%date:yyyy-MM-dd%/%LoadImage.image%_x", "8",
                                                       False, 8, False]}]}
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", graph)
    sent = page.evaluate("async () => (await window.app.graphToPrompt()).output['2'].inputs.filename_prefix")
    today = page.evaluate("() => { const d = new Date(); return d.getFullYear() + '-' + "
                          "String(d.getMonth() + 1).padStart(2, '0') + '-' + String(d.getDate()).padStart(2, '0'); }")
    assert sent == f"tokens/{today}/{sample}_x", sent
    before = _history_ids(comfy_server)
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    files = comfy_server.output_files(_wait_new_prompt(comfy_server, before))
    assert [f.relative_to(comfy_server.base / "output").as_posix() for f in files] == \
        [f"tokens/{today}/{sample}_x_00001_.png"]
    assert files[0].is_file()


MISSING_FILES = [  # (workflow, loader node, its file widget, a name the server lacks, where the page names the folder)
    ("transparent_sd15_diffumatting", "DiffuMattingUNetLoader", 0, "my_unet.safetensors", "error"),
    ("transparent_sd15_diffumatting", "DiffuMattingHeadLoader", 0, "my_head.safetensors", "error"),
    ("transparent_sdxl", "CheckpointLoaderSimple", 0, "my_pony_finetune.safetensors", "note"),
    ("transparent_sd15", "CheckpointLoaderSimple", 0, "my_sd15_finetune.safetensors", "note"),
    ("transparent_flux", "UNETLoader", 0, "flux1-schnell.safetensors", "note"),
    ("transparent_flux", "DualCLIPLoader", 1, "t5xxl_fp8_e4m3fn.safetensors", "note"),
]


@pytest.mark.parametrize("stem,node_type,index,name,folder_in", MISSING_FILES,
                         ids=[f"{m[0]}-{m[1]}" for m in MISSING_FILES])
def test_missing_model_file_is_named_in_the_page(page, comfy_server, server_models, stem, node_type, index, name,
                                                  folder_in):
    """Queued from the page with a model file the server lacks: nothing runs, and the page's node errors name
    the file. The pack's loaders name the folder in the error; for core's loaders (whose message lists the
    files it has) the workflow's Note, shown beside them, names the folder."""
    from fixtures_host import shrink_for_tiny

    workflow = shrink_for_tiny(json.loads((ROOT / "workflows" / f"{stem}.json").read_text()),
                               server_models["workflow_loras"].get(stem))
    node = next(n for n in workflow["nodes"] if n["type"] == node_type)
    node["widgets_values"][index] = name
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    before = _history_ids(comfy_server)
    page.evaluate("async () => { window.app.lastNodeErrors = null; await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.app.lastNodeErrors && Object.keys(window.app.lastNodeErrors).length",
                           timeout=60_000)
    errors = page.evaluate("() => window.app.lastNodeErrors")
    assert list(errors) == [str(node["id"])], f"only the loader is in error: {errors}"
    text = json.dumps(errors[str(node["id"])])
    assert name in text, f"the page's error does not name {name}: {text}"
    folder = {"DiffuMattingUNetLoader": "models/diffumatting", "DiffuMattingHeadLoader": "diffumatting",
              "CheckpointLoaderSimple": "ComfyUI/models/checkpoints/",
              "UNETLoader": "ComfyUI/models/diffusion_models/",
              "DualCLIPLoader": "ComfyUI/models/text_encoders/"}[node_type]
    if folder_in == "error":
        assert folder in text, f"the page's error does not name the folder {folder}: {text}"
    else:
        notes = page.evaluate("() => window.app.graph._nodes.filter(n => n.type === 'Note')"
                              ".map(n => n.widgets[0].value)")
        assert len(notes) == 1 and folder in notes[0], notes
    page.wait_for_timeout(500)
    assert _history_ids(comfy_server) == before, "a prompt with a missing file must not run"
