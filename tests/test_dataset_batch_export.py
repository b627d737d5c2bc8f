"""Batch asset export (issue 11, item 4): models/asset_export's naming and trimming, the Save Transparent
Batch node in-process (real folder_paths) and through the real ComfyUI server, bad input included."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from diffumatting.models.asset_export import (STEM_BYTES, STEM_CHARS, PromptLines, batch_prompts, numbered_names,
                                              output_subfolder, prompt_stem)
from diffumatting.models.png import read_png_text

NODE = "DiffuMattingSaveTransparentBatch"


# --- names -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,stem", [
    ("A Glass Bottle, studio light", "a-glass-bottle-studio-light"),
    ("../../etc/passwd", "etc-passwd"),
    ("C:\\Windows\\system32 <x>|?*:\"", "c-windows-system32-x"),
    ("bad\x00name\nwith\tcontrol\u202echars", "bad-name-with-control-chars"),
    ("Über Blätter, ＦＵＬＬＷＩＤＴＨ", "über-blätter-fullwidth"),
    ("猫の毛皮", "猫の毛皮"),
    ("🙂 !!! ...", "prompt"),
    ("a red mug, isolated on a flat green screen background", "a-red-mug"),
    ("a green frog", "a-green-frog"),
])
def test_prompt_stem_keeps_words_only(prompt, stem):
    assert prompt_stem(prompt) == stem


def test_prompt_stem_is_cut_in_characters_and_bytes():
    long = prompt_stem("word " * 100)
    assert len(long) <= STEM_CHARS and not long.endswith("-")
    wide = prompt_stem("毛" * 100)
    assert len(wide.encode()) <= STEM_BYTES and wide == "毛" * (STEM_BYTES // 3)


def test_batch_prompts_lines_and_errors():
    assert batch_prompts("a cup", 3) == ["a cup"] * 3
    assert batch_prompts("a\n\n b \nc\n", 3) == ["a", "b", "c"]
    assert batch_prompts("one prompt\nwritten over lines", 2, PromptLines.WHOLE_TEXT) == \
        ["one prompt\nwritten over lines"] * 2
    with pytest.raises(ValueError, match="2 lines for a batch of 3 images.*'whole text'"):
        batch_prompts("a\nb", 3)
    with pytest.raises(ValueError, match="prompts is empty"):
        batch_prompts(" \n ", 1)


def test_numbered_names_are_new_and_distinct():
    taken = ["cup-001.png", "Cup-007.png", "cup-x.png", "cup-002.txt", "contact_sheet-004.png", "mug-3.png"]
    assert numbered_names(["cup", "cup", "mug", "new"], taken) == \
        ["cup-008.png", "cup-009.png", "mug-004.png", "new-001.png"]
    assert numbered_names(["contact_sheet"], taken) == ["contact_sheet-005.png"]
    assert numbered_names(["robot-2"], ["robot-2-999.png"]) == ["robot-2-1000.png"]


def test_output_subfolder_refuses_escapes(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "link")
    (root / "a-file.png").write_bytes(b"x")
    path, rel = output_subfolder(" assets/run 1 ", str(root))
    assert path == str(root / "assets" / "run 1") and rel == "assets/run 1"
    for bad, words in [("../x", "outside"), ("a/../../x", "outside"), ("link/x", "outside"), (".", "outside"),
                       ("/abs", "absolute"), ("~/x", "absolute"), ("C:/x", "absolute"), ("", "empty"),
                       ("//", "empty"), ("a\0b", "NUL"), ("x" * 300, "255 bytes"), ("a-file.png", "is a file")]:
        with pytest.raises(ValueError, match=words):
            output_subfolder(bad, str(root))


def test_cli_asset_names_use_the_same_stems():
    from diffumatting.factory.jobs import make_jobs
    from diffumatting.factory.run import asset_names

    jobs = make_jobs(["A Glass Bottle!", "a glass bottle", "Fern"], 2, base_seed=1)
    names = asset_names(jobs)
    assert names[jobs[4].id] == "fern-001" and names[jobs[5].id] == "fern-002"
    bottles = [names[j.id] for j in jobs[:4]]
    assert all(n.startswith("a-glass-bottle-") for n in bottles) and len(set(bottles)) == 4


# --- the node in-process -------------------------------------------------------------------------------------
@pytest.fixture()
def batch_node(comfy_host, tmp_path, monkeypatch):
    from support.export_output import export_nodes_in

    _, out = export_nodes_in(tmp_path, monkeypatch)
    from diffumatting.nodes.batch_export import SaveTransparentBatch

    return SaveTransparentBatch, out


def _objects(n=2, h=40, w=50):
    """RGB with a soft-edged square per image, and its alpha (opacity)."""
    rgb = torch.rand(n, h, w, 3)
    alpha = torch.zeros(n, h, w)
    for i in range(n):
        alpha[i, 10 + i:20 + i, 12:30] = 1.0
        alpha[i, 9 + i, 12:30] = 0.4  # a soft edge row
    return rgb, alpha


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_node_writes_trimmed_named_pngs_and_sheet(batch_node):
    node, out = batch_node
    rgb, alpha = _objects()
    res = node.execute(rgb, prompts="A Glass Bottle, isolated on a flat green screen background", folder="props",
                       padding=2, alpha=alpha)
    assert _files(out) == ["a-glass-bottle-001.png", "a-glass-bottle-002.png", "contact_sheet-001.png"]
    for i in range(2):
        img = np.asarray(Image.open(out / "props" / f"a-glass-bottle-{i + 1:03d}.png"))
        assert img.shape == (11 + 4, 18 + 4, 4), "cut to the alpha's box (soft row included) plus padding"
        a = img[..., 3].astype(np.float32) / 255
        assert a[:2].max() == 0 and a[:, :2].max() == 0 and a[-2:].max() == 0, "padding is transparent"
        src_a = alpha[i, 9 + i:20 + i, 12:30].numpy()
        src = rgb[i, 9 + i:20 + i, 12:30].numpy()
        assert np.abs(a[2:-2, 2:-2] - src_a).max() <= 0.6 / 255
        # straight: the soft row keeps the object's colour, not colour * 0.4
        assert np.abs(img[2, 2:-2, :3] / 255.0 - src[0]).max() <= 0.6 / 255
    sheet = np.asarray(Image.open(out / "props" / "contact_sheet-001.png"))
    assert sheet.ndim == 3 and sheet.shape[-1] == 3
    greys = {tuple(v) for v in sheet[6:8, 6:8].reshape(-1, 3)} | {tuple(v) for v in sheet[4:140, 4].reshape(-1, 3)}
    assert (204, 204, 204) in greys and (153, 153, 153) in greys, "tiles over a checkerboard"
    shown = res.ui.as_dict()["images"]
    assert [r["filename"] for r in shown] == ["contact_sheet-001.png", "a-glass-bottle-001.png",
                                              "a-glass-bottle-002.png"]
    assert {r["subfolder"] for r in shown} == {"props"} and {r["type"] for r in shown} == {"output"}
    tensor = res.result[0]
    assert tensor.shape == (1, *sheet.shape) and np.abs(tensor[0].numpy() * 255 - sheet).max() <= 0.51


def test_node_numbers_past_existing_files_and_never_overwrites(batch_node):
    node, out = batch_node
    rgb, alpha = _objects(3)
    node.execute(rgb, prompts="cup\nmug\ncup", folder="set", alpha=alpha, bit_depth="16")
    first = {n: (out / "set" / n).read_bytes() for n in _files(out)}
    assert sorted(first) == ["contact_sheet-001.png", "cup-001.png", "cup-002.png", "mug-001.png"]
    raw = cv2.imread(str(out / "set" / "cup-001.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape[-1] == 4
    node.execute(rgb[:1], prompts="Cup", folder="set", alpha=alpha[:1], save_contact_sheet=False)
    after = _files(out)
    assert sorted(set(after) - set(first)) == ["cup-003.png"]
    assert all((out / "set" / n).read_bytes() == data for n, data in first.items())


def test_node_bad_input_writes_nothing(batch_node, tmp_path):
    node, out = batch_node
    rgb, alpha = _objects(3)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, out / "link")
    cases = [({"folder": "../x"}, "outside ComfyUI's output folder"),
             ({"folder": "/tmp/x"}, "absolute path"),
             ({"folder": "link/x"}, "outside ComfyUI's output folder"),
             ({"prompts": ""}, "prompts is empty"),
             ({"prompts": "a\nb"}, "2 lines for a batch of 3 images"),
             ({"prompt_lines": "bogus"}, r"prompt_lines='bogus' is not one of \['one per line', 'whole text'\]"),
             ({"bit_depth": "12"}, "bit_depth='12' is not one of"),
             ({"padding": -1}, "padding must be >= 0")]
    for kwargs, message in cases:
        args = {"prompts": "a cup", "folder": "good", "alpha": alpha, **kwargs}
        with pytest.raises(ValueError, match=message):
            node.execute(rgb, **args)
    with pytest.raises(ValueError, match="alpha has batch size 2 but the image has 3"):
        node.execute(rgb, prompts="a cup", alpha=torch.ones(2, 40, 50))
    assert node.validate_inputs(folder="../x").startswith("folder '../x' points outside")
    assert node.validate_inputs(folder="ok") is True
    assert _files(out) == [] and list(outside.iterdir()) == []


def test_node_full_disk_is_a_clear_error_and_writes_nothing(batch_node, monkeypatch, tmp_path):
    import folder_paths

    from support.small_disk import small_tmpfs

    node, _ = batch_node
    with small_tmpfs(tmp_path / "small_disk", "64k") as mount:
        monkeypatch.setattr(folder_paths, "output_directory", str(mount))
        noise = torch.rand(4, 64, 64, 4)  # incompressible, 16 bit: ~130 kB in all
        noise[..., 3] = 1.0
        with pytest.raises(RuntimeError, match="could not write the batch .*nothing was saved. Free disk space"):
            node.execute(noise, prompts="noise", folder="full", bit_depth="16")
        assert _files(mount) == [] and not list(mount.rglob(".*")), "no asset, no sheet, no temporary"


# --- through the real server ------------------------------------------------------------------------------------
def _prompt(server_models, **export) -> dict:
    inputs = {"images": ["3", 0], "prompts": "A Glass Bottle!\nfern, Über-leaf / ../../x\nA glass bottle",
              "prompt_lines": "one per line", "folder": "tests/batch", "bit_depth": "8", "padding": 4,
              "trim_threshold": 0.02, "save_contact_sheet": True}  # the keyed photo has a faint haze (<= 3/255)
    inputs.update(export)
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": server_models["green_sample"]}},
        "2": {"class_type": "DiffuMattingGreenPost", "inputs": {
            "image": ["1", 0], "key_mode": "auto", "key_color": "#00b140", "spill_strength": 1.0,
            "edge_detail": 0.5, "clip_black": 0.0, "clip_white": 1.0}},
        "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 2], "amount": 3}},
        "4": {"class_type": NODE, "inputs": inputs},
    }


@pytest.mark.server
def test_server_batch_export_and_bad_input(comfy_server, server_models):
    from comfy_client import WorkflowError
    from test_bad_input_server import _queue

    folder = comfy_server.base / "output" / "tests" / "batch"
    info = comfy_server.object_info()[NODE]
    spec = info["input"]["required"]["prompt_lines"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 Combo, or the older list form
    assert info["output_node"] and options == ["one per line", "whole text"]

    status, body = _queue(comfy_server, _prompt(server_models))
    assert status == 200, body
    entry = comfy_server.wait(body["prompt_id"])
    shown = [r["filename"] for r in entry["outputs"]["4"]["images"]]
    assert shown == ["contact_sheet-001.png", "a-glass-bottle-001.png", "fern-über-leaf-x-001.png",
                     "a-glass-bottle-002.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(shown)
    for name in shown[1:]:
        data = (folder / name).read_bytes()
        img = np.asarray(Image.open(folder / name))
        assert img.shape[-1] == 4 and img.shape[0] < 512 and img.shape[1] < 512, "trimmed to the object"
        a = img[..., 3]
        assert max(a[:4].max(), a[-4:].max(), a[:, :4].max(), a[:, -4:].max()) == 0, "4 px of transparent padding"
        # then the object's box: alpha > 0.02 there, at least round(0.02 * 255) = 5 once stored in 8 bits
        assert a[4].max() >= 5 and a[:, 4].max() >= 5 and a[-5].max() >= 5 and a[:, -5].max() >= 5
        assert json.loads(read_png_text(data)["prompt"])["4"]["class_type"] == NODE, "prompt embedded"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    # Queue-time refusals: nothing runs.
    for bad in ("../../escape", "/tmp/escape"):
        status, body = _queue(comfy_server, _prompt(server_models, folder=bad))
        errors = body.get("node_errors", {}).get("4", {}).get("errors", [])
        assert status == 400 and len(errors) == 1, body
        assert errors[0]["extra_info"]["input_name"] == "folder" and f"folder {bad!r}" in errors[0]["details"]
    # Run-time refusals (the batch size is known only then): the history names the problem.
    for widgets, words in [({"prompts": "a\nb"}, "2 lines for a batch of 3 images"),
                           ({"prompts": "  "}, "prompts is empty"),
                           ({"prompt_lines": "bogus"}, "prompt_lines='bogus' is not one of")]:
        status, body = _queue(comfy_server, _prompt(server_models, **widgets))
        assert status in (200, 400), body
        if status == 400:  # newer ComfyUI checks V3 Combo values at queue time
            assert "bogus" in json.dumps(body)
            continue
        with pytest.raises(WorkflowError, match=words):
            comfy_server.wait(body["prompt_id"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "refused batches write nothing"

    # A second batch is numbered past the first; nothing is overwritten.
    status, body = _queue(comfy_server, _prompt(server_models, padding=2, save_contact_sheet=False))
    entry = comfy_server.wait(body["prompt_id"])
    assert [r["filename"] for r in entry["outputs"]["4"]["images"]] == \
        ["a-glass-bottle-003.png", "fern-über-leaf-x-002.png", "a-glass-bottle-004.png"]
    assert all((folder / n).read_bytes() == data for n, data in before.items())
