"""Latent-space measurements of the green canvas on the tiny model (tests and tests/bench)."""
from __future__ import annotations

import torch

PROMPT = "a red apple, isolated on a flat green screen background"


def sample_latent(model, clip, seed: int, steps: int = 3, cfg: float = 5.0, size: int = 8) -> torch.Tensor:
    """KSampler-equivalent txt2img (euler, normal) on a size x size latent; returns the MODEL-space latent
    (process_in applied, the space the key colour latent is given in)."""
    import comfy.sample

    cond = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    lat = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(lat, seed)
    with torch.no_grad():
        out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", cond, neg, lat, disable_pbar=True)
    return model.model.process_latent_in(out)


def background_distance(latent: torch.Tensor, key: torch.Tensor, region: dict) -> tuple[float, float]:
    """(mean distance to the key latent outside the region, inside it), per latent pixel (L2 over channels)."""
    from diffumatting.models.green_canvas import background_weight

    h, w = latent.shape[-2:]
    bg = background_weight(h, w, **region) > 0.5
    d = (latent.float() - key.view(1, -1, 1, 1).float()).pow(2).sum(1).sqrt()[0]
    return float(d[bg].mean()), float(d[~bg].mean())
