"""GreenPost core (models/greenpost.py) on procedural composites with exact alpha and foreground, and the
GreenPost node in-process on the real ComfyUI modules."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from diffumatting.models.greenpost import GreenPostOptions, greenpost
from support.metrics import foreground_error
from diffumatting.models.synthetic import FLAT, REALISTIC, make_composite


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
    # well inside and far outside are exact
    assert np.abs(a[comp.alpha > 0.999] - 1).mean() < 0.01
    assert np.abs(a[comp.alpha < 1e-4]).mean() < 0.01
    if realism is REALISTIC:
        assert mae < 0.7 * vlahos_mae(comp)


@pytest.mark.parametrize("seed", [3, 4])
def test_solid_object_edges(seed):
    comp = make_composite(96, 128, seed, REALISTIC, hair=False, translucent=False)
    _, a = key(comp)
    assert np.abs(a - comp.alpha).mean() < 0.015


@pytest.mark.parametrize("seed", [0, 5])
def test_greenish_object_is_kept(seed):
    comp = make_composite(96, 128, seed, REALISTIC, greenish=True)
    fg, a = key(comp)
    assert np.abs(a - comp.alpha).mean() < 0.06
    inside = comp.alpha > 0.99
    assert a[inside].mean() > 0.8  # parts with the backing's own hue can stay see-through (use a prior)
    # its own green survives despill (the object is green-dominant)
    assert (fg[inside][:, 1] - fg[inside][:, [0, 2]].max(-1)).mean() > 0.02
    assert foreground_error(fg, comp.foreground, comp.alpha) < 0.06


def test_spill_removed_near_edges():
    """A neutral grey object with strong spill: unmixing alone leaves a green cast, despill removes it."""
    from diffumatting.models import synthetic as S

    realism = REALISTIC.__class__(falloff=0.3, shadow=0.3, spill=0.6, noise=0.01)
    _, alpha = S.random_object(128, 128, 7)
    grey = np.full((128, 128, 3), 0.55, np.float32)
    backing = S.green_backing(128, 128, 7, realism)
    image = S.composite(grey, alpha, backing, 7, realism)
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
    img[..., 2] = np.minimum(img[..., 2], img[..., 2])  # keep in range
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
    assert a[0].numpy()[solid].min() > 0.98


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
    _, a_clean = key(comp, edge_detail=0.0)
    _, a_detail = key(comp, edge_detail=1.0)
    assert float((a_clean < 1e-6).mean()) >= float((a_detail < 1e-6).mean())


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
    # picked key and a prior from the matting decode (1 = opaque)
    out = refine.GreenPost.execute(image, alpha_prior=torch.from_numpy(comps[0].alpha)[None].expand(2, -1, -1),
                                   key_mode="picked", key_color="#33bb33", spill_strength=0.5,
                                   edge_detail=0.3).result
    assert out[1].shape == (2, 48, 64)


def test_node_schema_tooltips_and_validation(refine):
    schema = refine.GreenPost.define_schema()
    assert schema.node_id == "DiffuMattingGreenPost" and schema.category == "DiffuMatting/refine"
    for item in [*schema.inputs, *schema.outputs]:
        assert item.tooltip, f"{item.id} has no tooltip"
    tips = {o.id: o.tooltip for o in schema.outputs}
    assert "1 = opaque" in tips["alpha"] and "1 = transparent" in tips["transparency_mask"]
    assert "1 = opaque" in next(i.tooltip for i in schema.inputs if i.id == "alpha_prior")
    assert refine.GreenPost.validate_inputs(key_mode="picked", key_color="#00b140") is True
    assert "hex colour" in refine.GreenPost.validate_inputs(key_mode="picked", key_color="green")
    assert "grey" in refine.GreenPost.validate_inputs(key_mode="picked", key_color="#808080")
    assert refine.GreenPost.validate_inputs(key_mode="auto", key_color="nonsense") is True
    assert "clip_black" in refine.GreenPost.validate_inputs(clip_black=0.8, clip_white=0.2)
    with pytest.raises(ValueError, match="alpha_prior"):
        refine.GreenPost.execute(torch.rand(2, 8, 8, 3), alpha_prior=torch.rand(3, 8, 8))


def test_node_interrupt_between_items(refine, monkeypatch):
    import comfy.model_management as mm

    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 2:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        refine.GreenPost.execute(torch.rand(3, 8, 8, 3))
    assert calls["n"] == 2
