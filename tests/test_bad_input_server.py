"""Bad widget values queued through the real server's API are refused at queue time, one message each
(issue 13, defect 1: a `**kwargs` validator made ComfyUI skip its own min/max and option checks)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.server


def _queue(server, prompt: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _errors(body: dict, node: str) -> list[tuple[str, str, str]]:
    """(type, input name, details) of each error the server reported for `node`."""
    found = body.get("node_errors", {}).get(node, {}).get("errors", [])
    return [(e["type"], e.get("extra_info", {}).get("input_name"), e.get("details", "")) for e in found]


def _save(image_link, **widgets) -> dict:
    inputs = {"image": image_link, "filename_prefix": "tests/bad", "bit_depth": "8", "trim": False, "padding": 8,
              "save_matte": False}
    inputs.update(widgets)
    return {"class_type": "DiffuMattingSaveRGBA", "inputs": inputs}


def _base(server_models) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": server_models["green_sample"]}}}


def _greenpost(**widgets) -> dict:
    inputs = {"image": ["1", 0], "key_mode": "auto", "key_color": "#00b140", "spill_strength": 1.0,
              "edge_detail": 0.5, "clip_black": 0.0, "clip_white": 1.0}
    inputs.update(widgets)
    return {"class_type": "DiffuMattingGreenPost", "inputs": inputs}


def _generation(server_models, **nodes) -> dict:
    names = server_models["generation"]
    prompt = {
        "c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["checkpoint"]}},
        "u": {"class_type": "DiffuMattingUNetLoader", "inputs": {"model": ["c", 0],
                                                               "unet_name": names["diffumatting_unet"],
                                                               "strength": 1.0}},
        "g": {"class_type": "DiffuMattingGreenCanvas", "inputs": {
            "model": ["u", 0], "vae": ["c", 2], "mode": "fixed ellipse", "key_color": "#00b140", "strength": 0.8,
            "end_percent": 0.35,
            "center_x": 0.5, "center_y": 0.5, "width": 0.6, "height": 0.7, "feather": 0.15}},
        "e": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["c", 1], "text": "a mug"}},
        "k": {"class_type": "KSampler", "inputs": {"model": ["g", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["p", 0], "negative": ["p", 0],
                                                   "latent_image": ["e", 0], "denoise": 1.0}},
        "h": {"class_type": "DiffuMattingHeadLoader", "inputs": {"head_name": server_models["matting_head"],
                                                                 "vae_family": "as in file"}},
        "d": {"class_type": "DiffuMattingVAEDecode", "inputs": {
            "samples": ["k", 0], "vae": ["c", 2], "head": ["h", 0], "refine_with_greenpost": True,
            "tiling": "auto", "tile_size": 512, "tile_overlap": 64}},
        "s": _save(["d", 2]),
    }
    for node, widgets in nodes.items():
        prompt[node]["inputs"].update(widgets)
    return prompt


def _assert_refused(server, prompt, expected: dict[str, list[tuple[str, str]]]):
    """The prompt is refused, each node reports exactly the expected (type, input) errors, once each, and no
    other node reports any (so each refusal is caused by its bad value alone)."""
    status, body = _queue(server, prompt)
    assert status == 400, f"queued anyway: {body}"
    failing = set(body.get("node_errors", {}))
    assert failing <= set(expected), f"nodes refused besides the bad values' own: {body['node_errors']}"
    for node, wanted in expected.items():
        got = _errors(body, node)
        assert sorted((t, name) for t, name, _ in got) == sorted(wanted), (node, got)


def test_save_and_preview_ranges(comfy_server, server_models):
    prompt = _base(server_models)
    prompt["2"] = _save(["1", 0], padding=5000)
    prompt["3"] = {"class_type": "DiffuMattingPreviewRGBA", "inputs": {
        "image": ["1", 0], "backdrop": "checkerboard", "color": "#202020", "cell": 0}}
    _assert_refused(comfy_server, prompt, {"2": [("value_bigger_than_max", "padding")],
                                           "3": [("value_smaller_than_min", "cell")]})
    assert not list((comfy_server.base / "output").rglob("bad_*"))


def test_greenpost_ranges(comfy_server, server_models):
    prompt = _base(server_models)
    prompt["2"] = _greenpost(spill_strength=7, clip_white=0.0)
    prompt["3"] = _save(["2", 2])
    _assert_refused(comfy_server, prompt, {"2": [("value_bigger_than_max", "spill_strength"),
                                                 ("value_smaller_than_min", "clip_white")]})


@pytest.mark.parametrize("node,widget,value", [("save", "bit_depth", "12"), ("greenpost", "key_mode", "bogus"),
                                               ("preview", "backdrop", "bogus")])
def test_unknown_choice_is_refused_once(comfy_server, server_models, node, widget, value):
    """Newer ComfyUI refuses an unknown V3 Combo value at queue time (one value_not_in_list error); 0.3.75
    never checks V3 Combos there, so the node refuses it when it runs, naming the value and the choices."""
    from comfy_client import WorkflowError

    prompt = _base(server_models)
    if node == "greenpost":
        prompt["2"] = _greenpost(**{widget: value})
        prompt["3"] = _save(["2", 2])
    elif node == "save":
        prompt["2"] = _save(["1", 0], **{widget: value})
    else:
        prompt["2"] = {"class_type": "DiffuMattingPreviewRGBA", "inputs": {
            "image": ["1", 0], "backdrop": value, "color": "#202020", "cell": 16}}
    status, body = _queue(comfy_server, prompt)
    if status == 400:
        assert [(t, n) for t, n, _ in _errors(body, "2")] == [("value_not_in_list", widget)], body
        return
    assert status == 200, body
    with pytest.raises(WorkflowError, match=rf"{widget}='{value}' is not one of \[.*\]; pick one of them"):
        comfy_server.wait(body["prompt_id"], timeout=300)
    assert not list((comfy_server.base / "output").rglob("bad_*"))


def test_custom_checks_give_one_message(comfy_server, server_models):
    prompt = _base(server_models)
    prompt["2"] = _greenpost(key_color="not-a-colour")
    prompt["3"] = _save(["2", 2], filename_prefix="../escape")
    status, body = _queue(comfy_server, prompt)
    assert status == 400
    assert [(t, n) for t, n, _ in _errors(body, "2")] == [("custom_validation_failed", "key_color")]
    assert "not a hex colour" in _errors(body, "2")[0][2]
    assert [(t, n) for t, n, _ in _errors(body, "3")] == [("custom_validation_failed", "filename_prefix")]
    assert "outside ComfyUI's output folder" in _errors(body, "3")[0][2]


def test_loader_and_canvas_ranges(comfy_server, server_models):
    prompt = _generation(server_models, u={"strength": 5.0}, g={"width": 0.0, "strength": 3.0},
                         d={"tile_size": 8})
    _assert_refused(comfy_server, prompt, {
        "u": [("value_bigger_than_max", "strength")],
        "g": [("value_smaller_than_min", "width"), ("value_bigger_than_max", "strength")],
        "h": [],
        "d": [("value_smaller_than_min", "tile_size")]})
