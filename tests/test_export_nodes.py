"""The export and alpha nodes in-process, on the real ComfyUI modules (folder_paths, comfy_api)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from support.export_output import export_nodes_in


@pytest.fixture()
def export_nodes(comfy_host, tmp_path, monkeypatch):
    """(nodes.export, output folder) with ComfyUI's output directory in tmp_path."""
    return export_nodes_in(tmp_path, monkeypatch)


def test_save_batch_straight_alpha_and_counter(export_nodes):
    nodes, out = export_nodes
    rgb = torch.rand(2, 6, 9, 3)
    alpha = torch.linspace(0, 1, 9).expand(2, 6, 9).contiguous()
    res = nodes.SaveRGBA.execute(rgb, filename_prefix="set/obj", alpha=alpha)
    files = sorted((out / "set").iterdir())
    assert [f.name for f in files] == ["obj_00001_.png", "obj_00002_.png"]
    arr = np.asarray(Image.open(files[1])).astype(np.float32) / 255
    # Straight alpha: colour is stored unmultiplied, even where alpha is 0.
    assert np.abs(arr[..., :3] - rgb[1].numpy()).max() <= 0.6 / 255
    assert np.abs(arr[..., 3] - alpha[1].numpy()).max() <= 0.6 / 255
    ui = res.ui.as_dict()
    assert [r["filename"] for r in ui["images"]] == ["obj_00001_.png", "obj_00002_.png"]
    nodes.SaveRGBA.execute(rgb[:1], filename_prefix="set/obj", alpha=alpha[:1])
    assert (out / "set" / "obj_00003_.png").is_file()


def test_save_trim_and_matte(export_nodes):
    nodes, out = export_nodes
    rgba = torch.zeros(1, 20, 30, 4)
    rgba[0, 5:10, 10:14] = 1.0
    nodes.SaveRGBA.execute(rgba, filename_prefix="trimmed", trim=True, padding=2, save_matte=True)
    img = Image.open(out / "trimmed_00001_.png")
    assert img.size == (4 + 4, 5 + 4) and img.mode == "RGBA"
    matte = Image.open(out / "trimmed_00001__matte.png")
    assert matte.mode in ("L", "I;16") and matte.size == img.size


def test_save_failure_leaves_no_half_written_batch(export_nodes, monkeypatch):
    nodes, out = export_nodes
    import diffumatting.nodes.export as export_module

    calls = {"n": 0}
    real = export_module.encode_png

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(export_module, "encode_png", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        nodes.SaveRGBA.execute(torch.rand(3, 4, 4, 4), filename_prefix="partial")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("prefix", ["../x", "/etc/x", "a/../../x", "", "  "])
def test_save_prefix_escape_refused(export_nodes, prefix):
    nodes, out = export_nodes
    msg = nodes.SaveRGBA.validate_inputs(filename_prefix=prefix)
    assert isinstance(msg, str) and "filename_prefix" in msg
    with pytest.raises(ValueError, match="filename_prefix"):
        nodes.SaveRGBA.execute(torch.rand(1, 2, 2, 3), filename_prefix=prefix)
    assert list(out.iterdir()) == []


def test_save_refuses_symlink_escape(export_nodes, tmp_path):
    nodes, out = export_nodes
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, out / "link")
    with pytest.raises(ValueError, match="outside ComfyUI's output folder"):
        nodes.SaveRGBA.execute(torch.rand(1, 2, 2, 3), filename_prefix="link/x")
    assert list(outside.iterdir()) == []


def test_preview_backdrops(export_nodes):
    nodes, _ = export_nodes
    rgba = torch.zeros(1, 32, 32, 4)
    rgba[..., 0] = 1.0
    rgba[0, :16, :, 3] = 1.0
    checker = nodes.PreviewRGBA.execute(rgba, backdrop="checkerboard", cell=8).result[0]
    assert checker.shape == (1, 32, 32, 3)
    assert torch.allclose(checker[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    bottom = checker[0, 16:, :, 0]
    assert bottom.max() > bottom.min()  # squares show through the transparent half
    colour = nodes.PreviewRGBA.execute(rgba, backdrop="color", color="#0000ff").result[0]
    assert torch.allclose(colour[0, 20, 20], torch.tensor([0.0, 0.0, 1.0]))
    raw = nodes.PreviewRGBA.execute(rgba, backdrop="transparent").result[0]
    assert raw.shape[-1] == 4
    assert "#RRGGBB" in nodes.PreviewRGBA.validate_inputs(color="blue")


def test_join_split_nodes_interoperate_with_core(export_nodes):
    nodes, _ = export_nodes
    from comfy_extras.nodes_compositing import JoinImageWithAlpha, SplitImageWithAlpha

    rgb = torch.rand(1, 5, 5, 3)
    alpha = torch.rand(1, 5, 5)
    ours = nodes.JoinAlpha.execute(rgb, alpha=alpha).result[0]
    # Core's split gives a transparency mask; our join takes it on the socket of that name.
    core_split = SplitImageWithAlpha.execute(ours)
    core_rgb, core_tmask = core_split.result if hasattr(core_split, "result") else core_split
    again = nodes.JoinAlpha.execute(core_rgb, transparency_mask=core_tmask).result[0]
    torch.testing.assert_close(again, ours)
    # Our split's transparency_mask feeds core's JoinImageWithAlpha directly.
    rgb2, alpha2, tmask2 = nodes.SplitAlpha.execute(ours).result
    core_join = JoinImageWithAlpha.execute(rgb2, tmask2)
    core_rgba = core_join.result[0] if hasattr(core_join, "result") else core_join[0]
    torch.testing.assert_close(core_rgba, ours)
    torch.testing.assert_close(alpha2, alpha)
    with pytest.raises(ValueError, match="needs `alpha`"):
        nodes.JoinAlpha.execute(rgb)


def test_alpha_sockets_read_the_same_on_every_node(comfy_host):
    """Every `alpha` / `transparency_mask` socket of the export, batch export, matting and GreenPost nodes is a MASK stating its one
    convention (nodes/_alpha_sockets.py): opacity for `alpha`, core's 1 = transparent for the other."""
    from comfy_api.latest import io

    from diffumatting.nodes import _alpha_sockets, batch_export, export, matting, refine

    tips = {"alpha": _alpha_sockets.ALPHA_TIP, "transparency_mask": _alpha_sockets.TMASK_TIP}
    assert "1 = opaque" in tips["alpha"] and "1 = transparent" in tips["transparency_mask"]
    seen = []
    for node in (*export.NODES, *batch_export.NODES, *matting.NODES, *refine.NODES):
        s = node.define_schema()
        for item in [*s.inputs, *s.outputs]:
            if item.id in tips:
                seen.append((s.node_id, item.id, item in s.inputs))
                assert item.tooltip == tips[item.id] and isinstance(item, (io.Mask.Input, io.Mask.Output)), \
                    (s.node_id, item.id)
    inputs = {n for n, _, is_input in seen if is_input}
    outputs = {n for n, _, is_input in seen if not is_input}
    assert inputs == {"DiffuMattingSaveRGBA", "DiffuMattingPreviewRGBA", "DiffuMattingJoinAlpha",
                      "DiffuMattingSaveTransparentBatch"}
    assert outputs == {"DiffuMattingSplitAlpha", "DiffuMattingVAEDecode", "DiffuMattingGreenPost"}
    assert len(seen) == 2 * (len(inputs) + len(outputs))
