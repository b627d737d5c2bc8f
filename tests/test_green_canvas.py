"""Training-free green canvas: pure maths, and measured in latent space on the tiny SD1.5 model."""
from __future__ import annotations

import pytest
import torch

from diffumatting.models.green_canvas import (CanvasMode, GreenCanvasGuide, background_weight, follow_background,
                                              guide_denoised, hex_to_rgb)

REGION = dict(center_x=0.5, center_y=0.5, width=0.6, height=0.7, feather=0.15)
KEY = "#00b140"


def test_background_weight_shape_and_softness():
    w = background_weight(32, 32, **REGION)
    assert w.shape == (32, 32)
    assert float(w[16, 16]) == 0.0 and float(w[0, 0]) == 1.0 and float(w[31, 31]) == 1.0
    row = w[16]
    assert 0 < float(row[3]) < 1 or 0 < float(row[4]) < 1 or 0 < float(row[5]) < 1, "feathered edge"
    hard = background_weight(32, 32, **{**REGION, "feather": 0.0})
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    shifted = background_weight(32, 32, **{**REGION, "center_x": 0.25})
    assert float(shifted[16, 8]) == 0.0 and float(shifted[16, 28]) == 1.0
    with pytest.raises(ValueError, match="width"):
        background_weight(8, 8, **{**REGION, "width": 0.0})


def test_hex_and_guide_math():
    assert hex_to_rgb("#00ff00") == (0.0, 1.0, 0.0)
    assert hex_to_rgb("0f0") == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="not a hex colour"):
        hex_to_rgb("green")
    den = torch.zeros(1, 4, 2, 2)
    key = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weight = torch.tensor([[0.0, 1.0], [0.5, 1.0]])
    out = guide_denoised(den, key, weight, 0.5)
    assert torch.allclose(out[0, :, 0, 0], torch.zeros(4))
    assert torch.allclose(out[0, :, 0, 1], 0.5 * key)
    assert torch.allclose(out[0, :, 1, 0], 0.25 * key)
    assert torch.equal(guide_denoised(den, key, weight, 0.0), den)
    with pytest.raises(ValueError, match="channels"):
        guide_denoised(torch.zeros(1, 16, 2, 2), key, weight, 0.5)


@pytest.fixture(scope="module")
def tiny(comfy_host, tmp_path_factory):
    import comfy.sd
    from support.tiny_sd15 import cached_tiny_sd15_checkpoint

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    path = cached_tiny_sd15_checkpoint(tmp_path_factory.getbasetemp() / "tiny_models")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
    yield {"model": model, "clip": clip, "vae": vae}
    torch.set_num_threads(old)


def test_background_moves_toward_key_colour_only_with_canvas_on(tiny):
    from green_measure import background_distance, sample_latent
    from diffumatting.nodes import generate

    model, clip, vae = tiny["model"], tiny["clip"], tiny["vae"]
    key = generate.key_colour_latent(vae, model, hex_to_rgb(KEY))
    on = generate.GreenCanvas.execute(model, vae, CanvasMode.ELLIPSE.value, KEY, 0.8, 0.35, **REGION).result[0]
    zero = generate.GreenCanvas.execute(model, vae, CanvasMode.ELLIPSE.value, KEY, 0.0, 0.35, **REGION).result[0]
    assert "sampler_post_cfg_function" not in model.model_options, "the input model must stay unpatched"
    bg_off, bg_on, in_off, in_on = [], [], [], []
    for seed in range(3):
        off_lat = sample_latent(model, clip, seed)
        assert torch.equal(sample_latent(zero, clip, seed), off_lat), "strength 0 must change nothing"
        b0, i0 = background_distance(off_lat, key, REGION)
        b1, i1 = background_distance(sample_latent(on, clip, seed), key, REGION)
        bg_off.append(b0), bg_on.append(b1), in_off.append(i0), in_on.append(i1)
    for b0, b1 in zip(bg_off, bg_on):
        assert b1 < 0.6 * b0, (bg_off, bg_on)
    # The object region is left to the model: it moves much less than the background.
    ratio_bg = sum(bg_on) / sum(bg_off)
    ratio_in = sum(in_on) / sum(in_off)
    assert ratio_in > ratio_bg + 0.3, (ratio_bg, ratio_in)


def test_green_canvas_refuses_bad_inputs(tiny):
    from diffumatting.nodes import generate

    assert "not a hex colour" in generate.GreenCanvas.validate_inputs(key_color="lime")
    with pytest.raises(ValueError, match="width"):
        generate.GreenCanvas.execute(tiny["model"], tiny["vae"], "fixed ellipse", KEY, 0.8, 0.35, 0.5, 0.5, 0.0, 0.7,
                                     0.1)
    with pytest.raises(ValueError, match="is not a valid CanvasMode"):
        generate.GreenCanvas.execute(tiny["model"], tiny["vae"], "circle", KEY)


# --- follow-object mode ---------------------------------------------------------------------------------
def _scene(mask: torch.Tensor, backing=(0.3, 0.6, 0.36), colour=(0.8, 0.2, 0.2)) -> torch.Tensor:
    img = torch.tensor(backing).view(1, 3, 1, 1).expand(1, 3, *mask.shape).clone()
    img[0][:, mask] = torch.tensor(colour).view(3, 1)
    return img


def test_follow_background_finds_objects_anywhere():
    key = torch.tensor(hex_to_rgb(KEY))
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    cases = {
        "off centre": ((xx - 7) ** 2 + (yy - 8) ** 2) <= 16,
        "touching the border": (xx < 10) & (yy > 5) & (yy < 25),
        "thin tall": (xx >= 26) & (xx <= 27) & (yy > 1) & (yy < 30),
        "two objects": (((xx - 8) ** 2 + (yy - 20) ** 2) <= 20) | ((xx > 20) & (yy < 10)),
    }
    for name, mask in cases.items():
        bg = follow_background(_scene(mask), key)[0]
        assert bg.shape == mask.shape
        assert float(bg[mask].max()) == 0.0, f"{name}: an object pixel was taken for background"
        # the object is protected by a margin: its 3x3 mean, one pixel grown, one 3x3 fade
        grown = torch.nn.functional.max_pool2d(mask[None, None].float(), 7, stride=1, padding=3)[0, 0] > 0
        assert float(bg[~grown].min()) == 1.0, f"{name}: backing away from the object was not found"
    # No object: everything is backing, even with pixel noise on it.
    noisy = _scene(torch.zeros(32, 32, dtype=torch.bool)) + 0.05 * torch.randn(1, 3, 32, 32,
                                                                             generator=torch.Generator().manual_seed(0))
    assert float(follow_background(noisy, key).min()) > 0.99
    with pytest.raises(ValueError, match="image latents"):
        follow_background(torch.zeros(1, 4, 2, 8, 8), key)


def test_follow_guide_leaves_object_and_pulls_backing():
    key = torch.tensor(hex_to_rgb(KEY))
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:9, 9:15] = True
    den = _scene(mask)
    guide = GreenCanvasGuide(key, 1.0, 0.5, None, CanvasMode.FOLLOW)
    out = guide({"denoised": den, "sigma": torch.tensor([1.0])})
    assert torch.equal(out[0][:, mask], den[0][:, mask]), "object pixels are never pulled"
    assert torch.allclose(out[0, :, 0, 0], key), "the backing far from the object becomes the key colour"
    assert torch.equal(guide({"denoised": den, "sigma": torch.tensor([0.4])}), den), "after end: model's own"
    with pytest.raises(ValueError, match="needs a region"):
        GreenCanvasGuide(key, 1.0, 0.5, None, CanvasMode.ELLIPSE)


def test_oracle_follow_meets_targets_on_two_placements():
    """The oracle benchmark's mechanism, two placements (the bench runs all of them)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "bench"))
    import green_canvas_oracle

    table = green_canvas_oracle.sd1_sigmas_table()
    sigmas = green_canvas_oracle.karras(float(table[0]), float(table[-1]), green_canvas_oracle.STEPS)
    for name in ("thin tall", "touching border"):
        mu01, mask = green_canvas_oracle.picture(green_canvas_oracle.placements()[name])
        bg, obj = green_canvas_oracle.measure(green_canvas_oracle.FOLLOW, table, sigmas, mu01, mask)
        assert bg <= 0.05 and obj <= 0.02, (name, bg, obj)
        ebg, eobj = green_canvas_oracle.measure(green_canvas_oracle.ELLIPSE_FULL, table, sigmas, mu01, mask)
        assert eobj > 0.1, f"{name}: the fixed ellipse guided to the end paints over the object ({eobj})"


def test_flux_16_channel_latents(comfy_host):
    """Flux's latent space (16 channels, its own shift and scale): the key colour's latent through a real
    16-channel KL VAE of ComfyUI's classes and Flux's latent format, then the follow guide on 16 channels."""
    from types import SimpleNamespace

    import comfy.latent_formats
    import comfy.sd
    from matting_fixtures import kl_ddconfig, random_vae_state_dict
    from diffumatting.nodes import generate

    dd = {**kl_ddconfig(ch=32, ch_mult=(1, 2, 2, 2)), "z_channels": 16}
    vae = comfy.sd.VAE(sd=random_vae_state_dict(dd, seed=3), config={"params": {"ddconfig": dd, "embed_dim": 16}})
    flux = comfy.latent_formats.Flux()
    key = generate.key_colour_latent(vae, SimpleNamespace(model=SimpleNamespace(process_latent_in=flux.process_in)),
                                     hex_to_rgb(KEY))
    assert key.shape == (16,) and torch.isfinite(key).all()
    den = key.view(1, 16, 1, 1).repeat(1, 1, 16, 16) + 0.3  # a backing off the key colour
    den[:, :, 4:12, 5:9] = -2.0  # the object
    out = GreenCanvasGuide(key, 1.0, 0.0, None, CanvasMode.FOLLOW)({"denoised": den, "sigma": torch.tensor([1.0])})
    assert torch.equal(out[:, :, 4:12, 5:9], den[:, :, 4:12, 5:9])
    assert torch.allclose(out[0, :, 0, 0], key, atol=1e-6)
    with pytest.raises(ValueError, match="16 channels"):
        guide_denoised(den[:, :4], key, torch.ones(16, 16), 1.0)
