"""GreenPost core (models/greenpost.py) on procedural composites with exact alpha and foreground, on the
real green-screen photos in ../shared (skipped when absent), and the GreenPost node in-process on the
real ComfyUI modules."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from diffumatting.models import greenpost as gp_module
from diffumatting.models.greenpost import GreenPostOptions, estimate_key_color, greenpost
from support.metrics import foreground_error
from diffumatting.models.synthetic import FLAT, REALISTIC, make_composite


PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "greenscreen_photos"


def core(mask: np.ndarray, r: int) -> np.ndarray:
    """`mask` eroded by r pixels: the part of a region at least r pixels from its border."""
    return cv2.erode(mask.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0


def key(comp, **opts):
    fg, a = greenpost(torch.from_numpy(comp.image)[None], options=GreenPostOptions(**opts))
    return fg[0].numpy(), a[0].numpy()


def vlahos_mae(comp) -> float:
    """Plain colour-difference keying with the true mean backing colour: the baseline to beat."""
    img, k = comp.image, comp.backing.reshape(-1, 3).mean(0)
    a = 1 - (img[..., 1] - img[..., [0, 2]].max(-1)) / (k[1] - k[[0, 2]].max())
    return float(np.abs(np.clip(a, 0, 1) - comp.alpha).mean())


@pytest.mark.parametrize("realism,mae_bound,fg_bound", [(FLAT, 0.03, 0.045), (REALISTIC, 0.035, 0.06)],
                         ids=["flat", "realistic"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_hair_and_translucency(realism, mae_bound, fg_bound, seed):
    comp = make_composite(96, 128, seed, realism)
    fg, a = key(comp)
    mae = np.abs(a - comp.alpha).mean()
    assert mae < mae_bound
    assert foreground_error(fg, comp.foreground, comp.alpha) < fg_bound
    # well inside and far outside are exact (8-bit output holds 255 and 0)
    solid, clean = core(comp.alpha > 0.999, 3), core(comp.alpha < 1e-4, 3)
    assert clean.sum() > 1000
    assert (a[solid] == 1).all() and (a[clean] == 0).all()
    if realism is REALISTIC:
        assert mae < 0.7 * vlahos_mae(comp)


@pytest.mark.parametrize("seed", [3, 4])
def test_solid_object_edges(seed):
    comp = make_composite(96, 128, seed, REALISTIC, hair=False, translucent=False)
    _, a = key(comp, refiner="off")  # the classical key alone
    assert np.abs(a - comp.alpha).mean() < 0.015
    _, a = key(comp)  # with the refiner (default), trained on hair-heavy data: measured 0.006 and 0.015
    assert np.abs(a - comp.alpha).mean() < 0.02


@pytest.mark.parametrize("seed", [0, 5])
def test_greenish_object_is_kept(seed):
    comp = make_composite(96, 128, seed, REALISTIC, greenish=True)
    fg, a = key(comp)
    assert np.abs(a - comp.alpha).mean() < 0.06
    inside = comp.alpha > 0.99
    # wherever the object's colour is clearly not the backing's, its interior is opaque; parts with the
    # backing's own colour can stay see-through (that is what the prior is for)
    separable = core(inside & (np.linalg.norm(comp.foreground - comp.backing, axis=-1) > 0.15), 3)
    assert separable.sum() >= 10
    assert (a[separable] == 1).all()
    # its own green survives despill (the object is green-dominant)
    assert (fg[inside][:, 1] - fg[inside][:, [0, 2]].max(-1)).mean() > 0.02
    assert foreground_error(fg, comp.foreground, comp.alpha) < 0.06


def test_spill_removed_near_edges():
    """A neutral grey object with strong spill: unmixing alone leaves a green cast, despill removes it."""
    from diffumatting.models import synthetic

    realism = REALISTIC.__class__(falloff=0.3, shadow=0.3, spill=0.6, noise=0.01)
    _, alpha = synthetic.random_object(128, 128, 7)
    grey = np.full((128, 128, 3), 0.55, np.float32)
    backing = synthetic.green_backing(128, 128, 7, realism)
    image = synthetic.composite(grey, alpha, backing, 7, realism)
    t = torch.from_numpy(image)[None]
    fg, _ = greenpost(t)
    fg0, _ = greenpost(t, options=GreenPostOptions(spill_strength=0.0))
    fg, fg0 = fg[0].numpy(), fg0[0].numpy()
    edge = (alpha > 0.3) & (alpha < 0.97)

    def cast(x):  # green excess over the larger other channel, per edge pixel
        return x[edge][:, 1] - x[edge][:, [0, 2]].max(-1)

    assert float((cast(fg0) > 0.02).mean()) > 0.2  # unmixing alone leaves spill on the edge
    assert float((cast(fg) > 0.02).mean()) == 0.0  # despill removes it
    # and stays near the true grey (the synthetic spill also darkens red and blue, which despill keeps)
    assert foreground_error(fg, grey, alpha, edge) < 0.05


def test_uneven_backing_is_followed():
    comp = make_composite(96, 96, 11, REALISTIC.__class__(falloff=0.6, shadow=0.5, spill=0.2, noise=0.01))
    _, a = key(comp)
    assert np.abs(a[comp.alpha < 1e-4]).max() < 0.1
    assert np.abs(a - comp.alpha).mean() < 0.035


def test_picked_blue_key():
    comp = make_composite(64, 80, 2, FLAT)
    blue = np.array([0.1, 0.25, 0.85], np.float32)
    img = comp.alpha[..., None] * comp.foreground + (1 - comp.alpha[..., None]) * blue
    fg, a = greenpost(torch.from_numpy(img)[None], options=GreenPostOptions(key_color=tuple(blue.tolist())))
    assert np.abs(a[0].numpy() - comp.alpha).mean() < 0.04


def test_prior_refines_and_acts_as_garbage_matte():
    comp = make_composite(96, 128, 4, REALISTIC)
    img = comp.image.copy()
    img[2:12, 2:12] = (0.9, 0.2, 0.2)  # a red rig in the corner the network knows is not the object
    t = torch.from_numpy(img)[None]
    _, a_plain = greenpost(t)
    assert a_plain[0, 2:12, 2:12].mean() > 0.9
    prior = torch.from_numpy(np.clip(comp.alpha + 0.0, 0, 1))[None]
    fg, a = greenpost(t, prior)
    a = a[0].numpy()
    assert np.abs(a[2:12, 2:12]).max() < 0.01
    assert np.abs(a - comp.alpha).mean() < np.abs(a_plain[0].numpy() - comp.alpha).mean()
    # alias used by the matting decode node
    _, a2 = greenpost(t, prior_alpha_bhw=prior)
    assert np.allclose(a2[0].numpy(), a)


def test_prior_keeps_greenish_interior():
    comp = make_composite(96, 128, 6, REALISTIC, greenish=True)
    prior = torch.from_numpy(comp.alpha)[None]
    _, a = greenpost(torch.from_numpy(comp.image)[None], prior)
    solid = cv2.erode((comp.alpha > 0.99).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert (a[0].numpy()[solid] == 1).all()


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 7, 13, 3), (2, 1, 9, 3), (1, 9, 1, 3), (3, 17, 5, 3)])
def test_any_shape(shape):
    torch.manual_seed(0)
    img = torch.rand(shape)
    fg, a = greenpost(img)
    assert fg.shape == (*shape[:3], 3) and a.shape == shape[:3]
    assert fg.dtype == torch.float32 and a.dtype == torch.float32
    assert torch.isfinite(fg).all() and torch.isfinite(a).all()
    assert 0 <= float(a.min()) and float(a.max()) <= 1 and 0 <= float(fg.min()) and float(fg.max()) <= 1


def test_single_pixels():
    green = torch.tensor([0.1, 0.8, 0.15]).view(1, 1, 1, 3)
    red = torch.tensor([0.8, 0.1, 0.15]).view(1, 1, 1, 3)
    _, a = greenpost(green)
    assert float(a) < 0.05
    _, a = greenpost(red, options=GreenPostOptions(key_color=(0.1, 0.8, 0.15)))
    assert float(a) > 0.95


def test_batch_matches_single_items():
    c1 = make_composite(40, 56, 1, REALISTIC)
    c2 = make_composite(40, 56, 2, REALISTIC)
    batch = torch.from_numpy(np.stack([c1.image, c2.image]))
    fg, a = greenpost(batch)
    for i, c in enumerate((c1, c2)):
        fgi, ai = greenpost(torch.from_numpy(c.image)[None])
        torch.testing.assert_close(a[i], ai[0])
        torch.testing.assert_close(fg[i], fgi[0])


def test_grey_rgba_and_dtypes():
    comp = make_composite(48, 64, 3, FLAT)
    rgb = torch.from_numpy(comp.image)[None]
    grey = rgb.mean(-1, keepdim=True)
    fg, a = greenpost(grey)
    assert fg.shape == (1, 48, 64, 3) and float(a.min()) > 0.95  # nothing green to key
    holes = torch.ones(1, 48, 64)
    holes[:, :, :10] = 0.25
    _, a_rgb = greenpost(rgb)
    _, a_rgba = greenpost(torch.cat([rgb, holes[..., None]], -1))
    torch.testing.assert_close(a_rgba, a_rgb * holes)
    fg64, a64 = greenpost(rgb.double())
    assert a64.dtype == torch.float32 and fg64.dtype == torch.float32
    torch.testing.assert_close(a64, a_rgb, atol=1e-5, rtol=0)
    _, a16 = greenpost(rgb.half())
    assert a16.dtype == torch.float32 and float((a16 - a_rgb).abs().mean()) < 0.01


def test_options_change_the_matte():
    comp = make_composite(64, 64, 8, REALISTIC)
    _, a = key(comp)
    _, a_clip = key(comp, clip_black=0.3, clip_white=0.7)
    partial = lambda x: float(((x > 0.01) & (x < 0.99)).mean())  # noqa: E731
    assert partial(a_clip) < partial(a)
    # edge_detail 0 snaps the faint values to 0/1, 1 keeps them: fewer partial pixels, more exact ones
    _, a_clean = key(comp, edge_detail=0.0)
    _, a_detail = key(comp, edge_detail=1.0)
    assert partial(a_detail) > partial(a_clean) + 0.03
    assert float((a_clean == 1).mean()) > float((a_detail == 1).mean()) + 0.01


@pytest.mark.parametrize("bad,match", [
    (torch.rand(8, 8, 3), "add the batch dimension"),
    (torch.rand(1, 8, 8, 2), "C = 1, 3 or 4"),
    (torch.rand(0, 8, 8, 3), "empty"),
    (torch.full((1, 4, 4, 3), float("nan")), "NaN"),
    (torch.rand(1, 4, 4, 3) * 255, "divide 8-bit images by 255"),
    (torch.randint(0, 255, (1, 4, 4, 3), dtype=torch.uint8), "dtype"),
    (np.zeros((1, 4, 4, 3), np.float32), "torch.Tensor"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        greenpost(bad)


def test_bad_priors_and_options():
    img = torch.rand(2, 8, 8, 3)
    with pytest.raises(ValueError, match=r"expected \(2, 8, 8\)"):
        greenpost(img, torch.rand(2, 8, 9))
    with pytest.raises(ValueError, match="1 = opaque"):
        greenpost(img, torch.rand(2, 8, 8) * 3)
    with pytest.raises(ValueError, match="not both"):
        greenpost(img, torch.rand(2, 8, 8), prior_alpha_bhw=torch.rand(2, 8, 8))
    for kwargs, match in [({"spill_strength": 2}, "spill_strength"), ({"edge_detail": -1}, "edge_detail"),
                          ({"key_color": (0.5, 0.5, 0.5)}, "grey"), ({"key_color": (0, 300, 0)}, "divide"),
                          ({"clip_black": 0.6, "clip_white": 0.4}, "clip_black")]:
        with pytest.raises(ValueError, match=match):
            GreenPostOptions(**kwargs)
    with pytest.raises(ValueError, match="GreenPostOptions"):
        greenpost(img, options={"spill_strength": 1})


def test_prior_broadcast_single_mask():
    comp = make_composite(32, 40, 1, FLAT)
    img = torch.from_numpy(np.stack([comp.image, comp.image]))
    _, a = greenpost(img, torch.from_numpy(comp.alpha))
    assert a.shape == (2, 32, 40)
    torch.testing.assert_close(a[0], a[1])


# ------------------------------------------------------------------------------------------ the node

@pytest.fixture()
def refine(comfy_host):
    from diffumatting.nodes import refine

    return refine


def test_node_batch_outputs_and_conventions(refine):
    comps = [make_composite(48, 64, s, REALISTIC) for s in (1, 2)]
    image = torch.from_numpy(np.stack([c.image for c in comps]))
    fg, alpha, rgba, tmask = refine.GreenPost.execute(image).result
    assert fg.shape == (2, 48, 64, 3) and alpha.shape == (2, 48, 64) and rgba.shape == (2, 48, 64, 4)
    torch.testing.assert_close(rgba[..., :3], fg)
    torch.testing.assert_close(rgba[..., 3], alpha)
    torch.testing.assert_close(tmask, 1 - alpha)
    for i, c in enumerate(comps):
        assert np.abs(alpha[i].numpy() - c.alpha).mean() < 0.035  # 1 = opaque object
    # picked key and a prior from the matting decode (1 = opaque): the node passes them on (its result is
    # the core's with the same options), the prior decides where it applies, and spill 0.5 removes half
    prior = torch.from_numpy(comps[0].alpha)[None].expand(2, -1, -1)
    outs = {s: refine.GreenPost.execute(image, alpha_prior=prior, key_mode="picked", key_color="#33bb33",
                                        spill_strength=s, edge_detail=0.3).result for s in (0.0, 0.5, 1.0)}
    opts = GreenPostOptions(key_color=(0x33 / 255, 0xbb / 255, 0x33 / 255), spill_strength=0.5, edge_detail=0.3)
    fg_core, a_core = greenpost(image, prior, opts)
    torch.testing.assert_close(outs[0.5][1], a_core)
    torch.testing.assert_close(outs[0.5][0], fg_core)
    _, a_plain = greenpost(image, None, opts)
    err = np.abs(outs[0.5][1][0].numpy() - comps[0].alpha).mean()  # image 0 is the prior's
    assert err < 0.03 and err < np.abs(a_plain[0].numpy() - comps[0].alpha).mean()
    assert not torch.allclose(outs[0.0][0], outs[1.0][0])
    torch.testing.assert_close(outs[0.5][0], (outs[0.0][0] + outs[1.0][0]) / 2, atol=1e-5, rtol=0)


def test_node_schema_tooltips_and_validation(refine):
    schema = refine.GreenPost.define_schema()
    assert schema.node_id == "DiffuMattingGreenPost" and schema.category == "DiffuMatting/refine"
    for item in [*schema.inputs, *schema.outputs]:
        assert item.tooltip, f"{item.id} has no tooltip"
    tips = {o.id: o.tooltip for o in schema.outputs}
    assert "1 = opaque" in tips["alpha"] and "1 = transparent" in tips["transparency_mask"]
    assert "1 = opaque" in next(i.tooltip for i in schema.inputs if i.id == "alpha_prior")
    assert refine.GreenPost.validate_inputs(key_color="#00b140") is True
    assert "hex colour" in refine.GreenPost.validate_inputs(key_color="green")
    with pytest.raises(ValueError, match="grey"):  # two-input checks run with the node (issue 13)
        refine.GreenPost.execute(torch.rand(1, 8, 8, 3), key_mode="picked", key_color="#808080")
    with pytest.raises(ValueError, match="clip_black"):
        refine.GreenPost.execute(torch.rand(1, 8, 8, 3), clip_black=0.8, clip_white=0.2)
    with pytest.raises(ValueError, match="alpha_prior"):
        refine.GreenPost.execute(torch.rand(2, 8, 8, 3), alpha_prior=torch.rand(3, 8, 8))


def test_node_interrupt_between_items(refine, monkeypatch):
    import comfy.model_management

    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 2:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", interrupt)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        refine.GreenPost.execute(torch.rand(3, 8, 8, 3))
    assert calls["n"] == 2


# ------------------------------------------------------------------------------- physics and backings

@pytest.mark.parametrize("name", ["elixir_image_greenscreen.jpg", "simplecv_greenscreen.png"])
def test_real_photo_solid_interior_is_255_and_backing_0(name):
    """A real green-screen photo keyed as RGB (simplecv's own alpha channel is 254, so it is dropped): the
    solid interior holds 255 and the clean backing 0 in 8-bit output."""
    from PIL import Image

    path = PHOTOS / name
    if not path.is_file():
        pytest.skip(f"shared photo {path} not present (benchmark data is not shipped with the pack)")
    rgb = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
    _, a = greenpost(torch.from_numpy(rgb)[None])
    a8 = (a[0].numpy() * 255 + 0.5).astype(np.uint8)
    r = 8  # 2-3 % of the short side: the interior, not the edge's transition
    solid, clean = core(a8 > 128, r), core(a8 < 128, r)
    clean[:r], clean[-r:], clean[:, :r], clean[:, -r:] = False, False, False, False  # the files' edge columns
    assert solid.sum() > 5000 and clean.sum() > 50000
    assert (a8[solid] == 255).all(), f"{int((a8[solid] < 255).sum())} interior pixels below 255"
    assert (a8[clean] == 0).all(), f"{int((a8[clean] > 0).sum())} backing pixels above 0"


def _on_backing(comp, colour):
    b = np.asarray(colour, np.float32)
    return comp.alpha[..., None] * comp.foreground + (1 - comp.alpha[..., None]) * b


@pytest.mark.parametrize("backing,channel", [((0.1, 0.25, 0.85), 2), ((0.12, 0.7, 0.2), 1), ((0.8, 0.15, 0.1), 0)],
                         ids=["blue", "green", "red"])
def test_auto_key_detects_the_backing_colour(backing, channel):
    comp = make_composite(80, 96, 2, FLAT)
    img = _on_backing(comp, backing)
    k = estimate_key_color(torch.from_numpy(img).permute(2, 0, 1))
    assert int(torch.argmax(k)) == channel
    torch.testing.assert_close(k, torch.tensor(backing), atol=0.02, rtol=0)
    _, a_auto = greenpost(torch.from_numpy(img)[None])
    _, a_picked = greenpost(torch.from_numpy(img)[None], options=GreenPostOptions(key_color=backing))
    assert np.abs(a_auto[0].numpy() - comp.alpha).mean() < 0.04
    torch.testing.assert_close(a_auto, a_picked, atol=0.02, rtol=0)


def test_auto_key_is_the_backing_not_a_big_saturated_object():
    """A large, strongly saturated red object in the middle of a green screen: the border decides."""
    img = np.empty((90, 120, 3), np.float32)
    img[:] = (0.1, 0.6, 0.3)
    img[10:80, 15:105] = (0.95, 0.05, 0.05)
    k = estimate_key_color(torch.from_numpy(img).permute(2, 0, 1))
    torch.testing.assert_close(k, torch.tensor([0.1, 0.6, 0.3]), atol=0.01, rtol=0)


def test_spill_removal_has_no_seam():
    """An opaque object whose colour turns smoothly from grey to green-tinted: the foreground must turn as
    smoothly (spill removal that switches on at a threshold leaves a visible step)."""
    H, W = 80, 240
    img = np.empty((H, W, 3), np.float32)
    img[:] = (0.1, 0.75, 0.2)
    t = np.linspace(0, 1, 200, dtype=np.float32)[:, None]
    img[20:60, 20:220] = ((1 - t) * np.array([0.5, 0.5, 0.5]) + t * np.array([0.35, 0.62, 0.35]))[None]
    fg, a = greenpost(torch.from_numpy(img)[None])
    row = fg[0, 40, 30:210].numpy()
    assert (a[0, 25:55, 25:215] == 1).all()
    step_in = np.abs(np.diff(img[40, 30:210], axis=0)).max()
    assert np.abs(np.diff(row, axis=0)).max() < 5 * step_in  # ~0.0008 per pixel in; a seam is ~0.1


def test_row_bands_match_the_whole_image(monkeypatch):
    """Large images are keyed in row bands (bounded memory); the bands must join without a trace."""
    comp = make_composite(150, 90, 4, REALISTIC)
    t = torch.from_numpy(comp.image)[None]
    prior = torch.from_numpy(comp.alpha)[None]
    whole = [greenpost(t), greenpost(t, prior)]
    monkeypatch.setattr(gp_module, "BAND_PIXELS", 90 * 7)  # bands of 7 rows (16 in the last pass)
    banded = [greenpost(t), greenpost(t, prior)]
    for (fg0, a0), (fg1, a1) in zip(whole, banded):
        torch.testing.assert_close(a1, a0, atol=1e-6, rtol=0)
        torch.testing.assert_close(fg1, fg0, atol=1e-6, rtol=0)


def _green_on_green():
    fg, alpha = make_composite(96, 128, 3, FLAT, hair=False, translucent=False).foreground, None
    from diffumatting.models.synthetic import random_object

    _, alpha = random_object(96, 128, 3, hair=False, translucent=False)
    key_col = np.array([0.15, 0.7, 0.2], np.float32)
    img = alpha[..., None] * (0.55 * key_col) + (1 - alpha[..., None]) * key_col  # a darker green object
    return torch.from_numpy(img.astype(np.float32))[None], torch.from_numpy(alpha)[None]


def test_green_object_on_green_warns_without_prior():
    img, alpha = _green_on_green()
    warnings = []
    _, a = greenpost(img, warnings=warnings)
    assert float(a.max()) < 0.5  # the colours cannot tell it from the backing ...
    assert len(warnings) == 1 and "alpha prior" in warnings[0] and "green object on green" in warnings[0]
    warnings = []
    _, a = greenpost(img, alpha, warnings=warnings)  # ... the prior can, and then nothing is said
    assert warnings == [] and np.abs(a[0].numpy() - alpha[0].numpy()).mean() < 0.01
    warnings = []
    greenpost(torch.from_numpy(make_composite(64, 80, 1, REALISTIC).image)[None], warnings=warnings)
    assert warnings == []
    warnings = []
    greenpost(torch.cat([img, torch.from_numpy(make_composite(96, 128, 1, REALISTIC).image)[None]]),
              warnings=warnings)
    assert len(warnings) == 1 and warnings[0].startswith("image 1 of 2: ")


def test_node_and_cli_show_the_warning(refine, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    img, _ = _green_on_green()
    out = refine.GreenPost.execute(img)
    assert "green object on green" in out.ui.as_dict()["text"][0]
    assert refine.GreenPost.execute(torch.from_numpy(make_composite(48, 64, 1, REALISTIC).image)[None]).ui is None
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray((img[0].numpy() * 255 + 0.5).astype(np.uint8)).save(src / "g.png")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "greenpost.py"), str(src), str(tmp_path / "out"), "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "warning: g.png:" in r.stderr and "alpha prior" in r.stderr
