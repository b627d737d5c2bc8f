"""Training-free green canvas: steer any SD1.x/SDXL sampler toward a flat key-colour backing.

Idea (after TKG-DM, CVPR 2025, which shifts the initial noise's channel means toward the key colour
outside the object's region): during the first part of sampling, the model's clean-image prediction
(x0, "denoised") is pulled toward the key colour's latent outside a soft central region. The sampler then
integrates that prediction into the trajectory, so the low-frequency layout (a flat backing around a
central object) is fixed in the high-noise steps, while the later steps are left to the model to draw
the object and the edges. Everything here is plain torch; the key colour's latent comes from the VAE at
run time (computed by the node).
"""
from __future__ import annotations

import math

import torch


def hex_to_rgb(color: str) -> tuple[float, float, float]:
    """'#00b140' / '00b140' / '#0b4' -> (r, g, b) in [0, 1]."""
    s = (color or "").strip().lstrip("#")
    if len(s) == 3:
        s = "".join(c * 2 for c in s)
    if len(s) != 6 or any(c not in "0123456789abcdefABCDEF" for c in s):
        raise ValueError(f"key colour {color!r} is not a hex colour; use e.g. #00b140 (chroma-key green)")
    return tuple(int(s[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def background_weight(h: int, w: int, center_x: float = 0.5, center_y: float = 0.5, width: float = 0.6,
                      height: float = 0.7, feather: float = 0.15, device=None,
                      dtype=torch.float32) -> torch.Tensor:
    """Soft background map of shape (h, w): 0 inside the central ellipse, 1 outside, smooth in between.

    The ellipse is centred at (center_x, center_y) (fractions of the width/height), with full axes
    `width` and `height` (fractions); `feather` is the width of the transition as a fraction of the
    smaller image side (0 = hard edge).
    """
    for name, v in (("width", width), ("height", height)):
        if not 0.0 < v <= 2.0:
            raise ValueError(f"region {name} {v} must be in (0, 2] (fraction of the image)")
    if feather < 0:
        raise ValueError(f"feather {feather} must be >= 0")
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    ry, rx = height / 2.0, width / 2.0
    # Normalised elliptic radius; distance outside the ellipse approximated in image fractions.
    r = torch.sqrt(((xx - center_x) / rx) ** 2 + ((yy - center_y) / ry) ** 2)
    dist = (r - 1.0) * min(rx, ry)
    if feather <= 0:
        return (dist > 0).to(dtype)
    t = torch.clamp(dist / feather + 0.5, 0.0, 1.0)
    return (t * t * (3 - 2 * t)).to(dtype)  # smoothstep


def key_latent_mean(latent: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of an encoded flat key-colour image: (C,) from (B, C, H, W) (or 5-D video)."""
    dims = [d for d in range(latent.ndim) if d != 1]
    return latent.float().mean(dim=dims)


def guide_denoised(denoised: torch.Tensor, key: torch.Tensor, weight: torch.Tensor,
                   strength: float) -> torch.Tensor:
    """Pull `denoised` (B, C, H, W) toward the key latent `key` (C,) by `strength * weight` (H, W)."""
    if strength <= 0:
        return denoised
    w = (float(strength) * weight).to(denoised.device, denoised.dtype)
    while w.ndim < denoised.ndim:
        w = w.unsqueeze(0)
    k = key.to(denoised.device, denoised.dtype).view(1, -1, *([1] * (denoised.ndim - 2)))
    if k.shape[1] != denoised.shape[1]:
        raise ValueError(f"key latent has {k.shape[1]} channels but the model's latent has {denoised.shape[1]}: "
                         "use the VAE that belongs to the checkpoint")
    return denoised + w * (k - denoised)


def shift_noise(noise: torch.Tensor, key: torch.Tensor, weight: torch.Tensor, shift: float,
                sigma: float) -> torch.Tensor:
    """TKG-DM-style initial-noise shift: add `shift * key / sigma` (in unit-noise terms) in the background.

    Returned noise is what a sampler multiplies by `sigma`; the background starts `shift` of the way
    toward the key latent before the first step. Offered for custom samplers; the node uses the x0 pull.
    """
    if sigma <= 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma {sigma} must be a positive number")
    w = weight.to(noise.device, noise.dtype)
    while w.ndim < noise.ndim:
        w = w.unsqueeze(0)
    k = key.to(noise.device, noise.dtype).view(1, -1, *([1] * (noise.ndim - 2)))
    return noise + float(shift) * w * k / sigma


class GreenCanvasGuide:
    """Post-CFG function for ComfyUI samplers: pulls x0 toward the key latent while sigma >= sigma_end.

    `key` is the key colour's latent in the MODEL's latent space (after process_in). The region map is
    computed for each latent size on the fly (cheap, not cached).
    """

    def __init__(self, key: torch.Tensor, strength: float, sigma_end: float, region: dict):
        self.key = key.detach().float().cpu()
        self.strength = float(strength)
        self.sigma_end = float(sigma_end)
        self.region = dict(region)

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = args["sigma"]
        s = float(sigma.max()) if torch.is_tensor(sigma) else float(sigma)
        if self.strength <= 0 or s < self.sigma_end:
            return denoised
        h, w = denoised.shape[-2:]
        weight = background_weight(h, w, device=denoised.device, **self.region)
        return guide_denoised(denoised, self.key, weight, self.strength)
