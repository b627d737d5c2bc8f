"""The pack in the real ComfyUI server: registration, schema hygiene, every workflow over HTTP."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_client import WorkflowError, ui_to_api
from fixtures_host import RUN_FROM_PAGE_ONLY
from diffumatting.models.png import read_png_text

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
API_RUN_WORKFLOWS = [p for p in WORKFLOWS if p.stem not in RUN_FROM_PAGE_ONLY]

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def pack_node_ids(comfy_host) -> list[str]:
    from diffumatting.nodes import comfy_entrypoint

    async def collect():
        ext = await comfy_entrypoint()
        return [node.define_schema().node_id for node in await ext.get_node_list()]

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


def test_object_info_lists_every_node(pack_node_ids, object_info):
    assert len(pack_node_ids) == len(set(pack_node_ids)), "node ids must be unique"
    missing = [n for n in pack_node_ids if n not in object_info]
    assert not missing, f"nodes not registered by the server: {missing}"


def test_every_node_documents_its_sockets(pack_node_ids, object_info):
    problems = []
    for node_id in pack_node_ids:
        info = object_info[node_id]
        if not info["category"].startswith("DiffuMatting/"):
            problems.append(f"{node_id}: category {info['category']!r}")
        if not info.get("description"):
            problems.append(f"{node_id}: no description")
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                if not opts.get("tooltip"):
                    problems.append(f"{node_id}.{name}: input without tooltip")
        for name, tip in zip(info["output_name"], info.get("output_tooltips") or [None] * len(info["output"])):
            if not tip:
                problems.append(f"{node_id} -> {name}: output without tooltip")
    assert not problems, "\n".join(problems)


def test_no_workflow_names_a_fixture_and_every_widget_list_matches(object_info):
    from fixtures_host import FIXTURE_NAMES

    assert {p.stem for p in WORKFLOWS} >= {"transparent_sd15", "transparent_sd15_diffumatting", "transparent_sdxl",
                                            "transparent_flux", "key_green_screen"}
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        values = [v for n in workflow["nodes"] for v in (n.get("widgets_values") or [])]
        named = [v for v in values if isinstance(v, str) and (v in FIXTURE_NAMES or "tiny" in v.lower())]
        assert not named, f"{path.name} names test fixtures: {named}"
        ui_to_api(workflow, object_info, missing_files_ok=True)  # refuses widget lists that do not match a node
        if path.stem.startswith("transparent_"):
            notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
            assert len(notes) == 1 and "ComfyUI/models/" in notes[0], f"{path.name}: a Note says which files, where"
            needs = "NEEDS DiffuMatting weights" in notes[0]
            has_dm = any(n["type"] in ("DiffuMattingUNetLoader", "DiffuMattingHeadLoader") for n in workflow["nodes"])
            assert needs == has_dm, f"{path.name}: the note must say whether DiffuMatting weights are needed"
            sizes = [n["widgets_values"][:2] for n in workflow["nodes"] if n["type"].startswith("Empty")]
            steps = [n["widgets_values"][2] for n in workflow["nodes"] if n["type"] == "KSampler"]
            assert sizes and all(s in ([512, 512], [1024, 1024]) for s in sizes), (path.name, sizes)
            assert steps and all(s >= 20 for s in steps), (path.name, steps)


def test_client_refuses_widgets_that_do_not_match(object_info):
    workflow = json.loads((ROOT / "workflows" / "key_green_screen.json").read_text())
    post = next(n for n in workflow["nodes"] if n["type"] == "DiffuMattingGreenPost")
    n = len(post["widgets_values"])
    post["widgets_values"].append("full")  # a stale value for an option the node no longer has
    with pytest.raises(WorkflowError, match=rf"DiffuMattingGreenPost\) has {n + 1} widget values .* take {n}"):
        ui_to_api(workflow, object_info)
    post["widgets_values"] = post["widgets_values"][:6]
    post["widgets_values"][0] = "sideways"
    with pytest.raises(WorkflowError, match="key_mode='sideways' is not one of its options"):
        ui_to_api(workflow, object_info)
    post["widgets_values"][0] = "auto"
    post["widgets_values"][2] = "strong"
    with pytest.raises(WorkflowError, match="spill_strength='strong' is not a FLOAT"):
        ui_to_api(workflow, object_info)


def test_missing_model_file_names_the_file_and_its_folder(comfy_server, object_info):
    """What the page shows when a file is missing: the server's answer to the queued prompt."""
    from fixtures_host import shrink_for_tiny

    workflow = shrink_for_tiny(json.loads((ROOT / "workflows" / "transparent_sd15_diffumatting.json").read_text()))
    unet = next(n for n in workflow["nodes"] if n["type"] == "DiffuMattingUNetLoader")
    head = next(n for n in workflow["nodes"] if n["type"] == "DiffuMattingHeadLoader")

    def server_error(w) -> str:
        with pytest.raises(WorkflowError) as err:
            comfy_server.post("/prompt", {"prompt": ui_to_api(w, object_info, missing_files_ok=True)})
        return str(err.value)

    unet["widgets_values"][0] = "my_unet.safetensors"
    assert "'my_unet.safetensors' not found in models/diffumatting" in server_error(workflow)
    unet["widgets_values"][0] = "diffumatting_unet_sd15.safetensors"
    head["widgets_values"][0] = "my_head.safetensors"
    assert re.search(r"'my_head.safetensors' not found in .*diffumatting", server_error(workflow))
    # Core's loaders name the file (their folder is in the workflow's note).
    ckpt = next(n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")
    head["widgets_values"][0] = "diffumatting_head_sd15.safetensors"
    ckpt["widgets_values"][0] = "my_checkpoint.safetensors"
    assert "my_checkpoint.safetensors" in server_error(workflow)
    # The client itself names a missing file before queueing.
    with pytest.raises(WorkflowError, match="'my_checkpoint.safetensors': this server has no such model file"):
        ui_to_api(workflow, object_info)


@pytest.mark.parametrize("path", API_RUN_WORKFLOWS, ids=[p.stem for p in API_RUN_WORKFLOWS])
def test_workflow_runs_and_writes_rgba_png(comfy_server, server_models, object_info, path):
    """Each shipped workflow as an artist runs it (public names mapped to the family's tiny fixture, a LoRA
    in the stack's first row, small size and few steps). The ones in RUN_FROM_PAGE_ONLY run through this same
    server from the page, with the same checks (test_browser.py)."""
    from fixtures_host import check_writes_rgba_png, shrink_for_tiny

    workflow = shrink_for_tiny(json.loads(path.read_text()), server_models["workflow_loras"].get(path.stem))
    entry = comfy_server.run_workflow(workflow, timeout=600)
    check_writes_rgba_png(comfy_server.output_files(entry), path.name)


def test_key_green_screen_separates_object_from_backing(comfy_server):
    workflow = json.loads((ROOT / "workflows" / "key_green_screen.json").read_text())
    entry = comfy_server.run_workflow(workflow, timeout=600)
    png = [f for f in comfy_server.output_files(entry) if Image.open(f).mode == "RGBA"][0]
    arr = np.asarray(Image.open(png)).astype(np.float32) / 255
    alpha = arr[..., 3]
    h, w = alpha.shape
    corners = np.concatenate([alpha[:h // 8, :w // 8].ravel(), alpha[-h // 8:, -w // 8:].ravel()])
    assert corners.mean() < 0.02, "the green backing must come out transparent"
    # The sample is tests/support/samples.py's: seed 3 at this size, so its true alpha is known exactly.
    import cv2

    from diffumatting.models.synthetic import REALISTIC, make_composite

    truth = make_composite(h, w, 3, REALISTIC)
    kernel = np.ones((5, 5), np.uint8)
    inside = cv2.erode((truth.alpha >= 0.999).astype(np.uint8), kernel) > 0
    backing = cv2.erode((truth.alpha <= 0.001).astype(np.uint8), kernel) > 0
    assert inside.mean() > 0.02 and backing.mean() > 0.3
    assert alpha[inside].mean() >= 0.98 and np.percentile(alpha[inside], 5) >= 0.9, "the object must be opaque"
    assert alpha[backing].mean() <= 0.01 and np.percentile(alpha[backing], 99) <= 0.05, "the backing must be clear"
    opaque = alpha > 0.95
    dominance = arr[..., 1] - np.maximum(arr[..., 0], arr[..., 2])
    f = truth.foreground
    true_dominance = f[..., 1] - np.maximum(f[..., 0], f[..., 2])
    assert np.percentile(dominance[opaque], 95) <= np.percentile(true_dominance[truth.alpha > 0.95], 95) + 0.01, \
        "the object must carry no more green than the true foreground (spill removed)"


def _save_prompt(sample: str, prefix: str, **widgets) -> dict:
    save_inputs = {"image": ["1", 0], "filename_prefix": prefix, "bit_depth": "8", "trim": False,
                   "padding": 8, "save_matte": False}
    save_inputs.update(widgets)
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": sample}},
        "2": {"class_type": "DiffuMattingSaveRGBA", "inputs": save_inputs},
    }


def test_save_refuses_prefix_outside_output(comfy_server, server_models):
    for prefix in ("../escape", "/tmp/escape", "a/../../escape"):
        with pytest.raises(WorkflowError, match="outside ComfyUI's output folder|absolute path"):
            comfy_server.post("/prompt", {"prompt": _save_prompt(server_models["green_sample"], prefix)})
    assert not (comfy_server.base / "escape_00001_.png").exists()


@pytest.fixture(scope="module")
def rgba_sample(comfy_server) -> tuple[str, np.ndarray]:
    """An RGBA PNG in the server's input folder: a soft-edged disk (alpha 0..255) off-centre on clear pixels."""
    h, w = 40, 56
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - 17, xx - 30)
    alpha = np.clip((12.0 - dist) / 4.0, 0, 1)
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 0] = (xx * 255 // (w - 1)).astype(np.uint8)
    rgba[..., 1] = 90
    rgba[..., 2] = (yy * 255 // (h - 1)).astype(np.uint8)
    rgba[..., 3] = np.round(alpha * 255).astype(np.uint8)
    name = "diffumatting_rgba_disk.png"
    Image.fromarray(rgba, "RGBA").save(comfy_server.base / "input" / name)
    return name, rgba


def _run_prompt(server, prompt: dict) -> list[Path]:
    answer = server.post("/prompt", {"prompt": prompt})
    return server.output_files(server.wait(answer["prompt_id"]))


def test_transparency_mask_from_rgba_load_image(comfy_server, rgba_sample):
    """LoadImage's MASK (core's convention: 1 = transparent) goes into transparency_mask, no InvertMask: the saved
    PNG has the input's own alpha and colours."""
    name, rgba = rgba_sample
    prompt = _save_prompt(name, "tests/convention")
    prompt["2"]["inputs"]["transparency_mask"] = ["1", 1]
    files = _run_prompt(comfy_server, prompt)
    assert len(files) == 1
    saved = np.asarray(Image.open(files[0]))
    assert saved.shape == rgba.shape
    assert np.array_equal(saved[..., 3], rgba[..., 3]), "alpha must be the input's (convention kept)"
    seen = rgba[..., 3] > 0
    assert np.array_equal(saved[..., :3][seen], rgba[..., :3][seen]), "straight colour, not premultiplied"


def test_save_16_bit_trimmed_with_matte(comfy_server, rgba_sample):
    name, rgba = rgba_sample
    prompt = _save_prompt(name, "tests/sixteen", bit_depth="16", trim=True, padding=3, save_matte=True)
    # A LoadImage MASK is a transparency mask: connect it where this pack expects that convention.
    prompt["2"]["inputs"]["transparency_mask"] = ["1", 1]
    files = _run_prompt(comfy_server, prompt)
    assert len(files) == 1 and files[0].parent.name == "tests"
    matte = files[0].with_name(files[0].stem + "_matte.png")
    assert matte.is_file()
    import cv2

    saved = cv2.cvtColor(cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    assert saved.dtype == np.uint16 and saved.shape[2] == 4
    # Trim: the bounding box of the visible pixels plus 3 px of padding, inside the image.
    ys, xs = np.nonzero(rgba[..., 3])
    y0, y1 = max(0, ys.min() - 3), min(rgba.shape[0], ys.max() + 1 + 3)
    x0, x1 = max(0, xs.min() - 3), min(rgba.shape[1], xs.max() + 1 + 3)
    assert saved.shape[:2] == (y1 - y0, x1 - x0)
    crop = rgba[y0:y1, x0:x1].astype(np.uint16) * 257  # 8-bit v is 16-bit v * 257 exactly
    assert np.array_equal(saved[..., 3], crop[..., 3])
    seen = crop[..., 3] > 0
    assert np.array_equal(saved[..., :3][seen], crop[..., :3][seen])
    matte_px = cv2.imread(str(matte), cv2.IMREAD_UNCHANGED)
    assert matte_px.dtype == np.uint16 and np.array_equal(matte_px, saved[..., 3])
    text = read_png_text(files[0].read_bytes())
    embedded = json.loads(text["prompt"])  # the server adds its own keys (is_changed) to each node
    assert {k: (v["class_type"], v["inputs"]) for k, v in embedded.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()}, "the PNG carries the prompt that made it"


def test_ui_to_api_reports_unknown_node_type(object_info):
    wf = {"nodes": [{"id": 1, "type": "NoSuchNode", "inputs": [], "widgets_values": []}], "links": []}
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api(wf, object_info)
