"""Training-free green canvas: steer any sampler toward a flat key-colour backing.

Idea (after TKG-DM, CVPR 2025, which shifts the initial noise's channel means toward the key colour
outside the object's region): during the first part of sampling, the model's clean-image prediction
(x0, "denoised") is pulled toward the key colour's latent in the background. The sampler integrates that
prediction into the trajectory, so the low-frequency layout (a flat backing around the object) is fixed
in the high-noise steps, while the later steps are left to the model to draw the object and its edges.

Where the background is comes from one of two modes (CanvasMode):
- FOLLOW: read from the model's own x0 prediction at every guided step. The backing the prompt asks for
  is the colour cluster nearest the key colour: seeded by the predictions nearest the key, grown to every
  latent pixel whose prediction is as close to that backing colour as the backing's own spread (an Otsu
  split of the distances), and the object (everything else) is protected with a small margin. The canvas
  follows the object wherever it is, at any size, touching a border, several objects, thin shapes.
- ELLIPSE: a fixed soft ellipse (centre, axes, feather given by the user) is the object region.
Everything here is plain torch; the key colour's latent comes from the VAE at run time (computed by the
node).
"""
from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F


class CanvasMode(str, Enum):
    FOLLOW = "follow object"
    ELLIPSE = "fixed ellipse"


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
    """Pull `denoised` (B, C, H, W) toward the key latent `key` (C,) by `strength * weight` ((H, W) or
    (B, H, W))."""
    if strength <= 0:
        return denoised
    w = (float(strength) * weight).to(denoised.device, denoised.dtype)
    if w.ndim == 3:  # per-item map (B, H, W): broadcast over channels
        w = w.unsqueeze(1)
    while w.ndim < denoised.ndim:
        w = w.unsqueeze(0)
    k = key.to(denoised.device, denoised.dtype).view(1, -1, *([1] * (denoised.ndim - 2)))
    if k.shape[1] != denoised.shape[1]:
        raise ValueError(f"key latent has {k.shape[1]} channels but the model's latent has {denoised.shape[1]}: "
                         "use the VAE that belongs to the checkpoint")
    return denoised + w * (k - denoised)


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of a 1-D sample: the split that maximises the between-class variance."""
    v = values.float().flatten()
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return hi
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float32) + 0.5) * (hi - lo) / bins
    w0 = torch.cumsum(hist, 0)
    w1 = hist.sum() - w0
    m0 = torch.cumsum(hist * centres, 0) / w0.clamp_min(1e-12)
    m1 = ((hist * centres).sum() - torch.cumsum(hist * centres, 0)) / w1.clamp_min(1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    i = int(torch.argmax(between[:-1])) if bins > 1 else 0
    return lo + (i + 1) * (hi - lo) / bins


def follow_background(denoised: torch.Tensor, key: torch.Tensor, seed_fraction: float = 0.2,
                      margin: int = 0) -> torch.Tensor:
    """Background map (B, H, W) in [0, 1] read from the x0 prediction `denoised` (B, C, H, W).

    Per item: the backing colour is the mean prediction over the `seed_fraction` of latent pixels nearest
    the key latent `key` (C,); a pixel is background when the distance of its 3x3 mean to that colour is
    below the Otsu split of all such distances, and never below four times their `seed_fraction` quantile (so a frame with no
    object stays all background); next to such an object a pixel's own prediction is read too (corners,
    thin parts). The object is grown by `margin` latent pixels, and the map fades in over one 3x3 box
    outside the object, never onto it.
    """
    if denoised.ndim != 4:
        raise ValueError(f"the follow mode reads image latents (B, C, H, W), got shape {tuple(denoised.shape)}")
    if not 0.0 < seed_fraction < 1.0:
        raise ValueError(f"seed_fraction {seed_fraction} must be in (0, 1)")
    raw = denoised.detach().float()
    b, c, h, w = raw.shape
    # Classify a 3x3 neighbourhood's mean: a prediction's pixel noise must not split the backing.
    x = F.avg_pool2d(F.pad(raw, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    k = key.to(x.device, torch.float32).view(1, c, 1, 1)
    flat, raw_flat = x.flatten(2), raw.flatten(2)  # (B, C, N)
    d_key = (x - k).pow(2).sum(1).sqrt().flatten(1)  # (B, N)
    n_seed = max(1, int(round(seed_fraction * h * w)))
    out = torch.empty(b, h, w, device=x.device)
    for i in range(b):
        seeds = torch.topk(d_key[i], n_seed, largest=False).indices
        backing = flat[i][:, seeds].mean(1, keepdim=True)  # (C, 1)
        dist = (flat[i] - backing).pow(2).sum(0).sqrt()  # (N,)
        spread = float(torch.quantile(dist, seed_fraction))
        threshold = max(otsu_threshold(dist), 4.0 * spread)
        obj_i = (dist > threshold).view(1, 1, h, w).float()
        # Next to a found object, a single pixel's own prediction counts too (corners, thin parts).
        near = F.max_pool2d(obj_i, 3, stride=1, padding=1) > 0
        raw_obj = ((raw_flat[i] - backing).pow(2).sum(0).sqrt() > threshold).view(1, 1, h, w)
        out[i] = 1.0 - (obj_i.bool() | (raw_obj & near)).float()[0, 0]
    obj = 1.0 - out.unsqueeze(1)
    if margin > 0:
        obj = F.max_pool2d(obj, 2 * margin + 1, stride=1, padding=margin)
    bg = 1.0 - obj
    bg = bg * F.avg_pool2d(F.pad(bg, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # fade, never onto the object
    return bg[:, 0].to(denoised.dtype)


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

    `key` is the key colour's latent in the MODEL's latent space (after process_in). In FOLLOW mode the
    background is read from each step's x0 prediction; in ELLIPSE mode `region` (background_weight's
    arguments) gives it. Nothing is cached between calls.
    """

    def __init__(self, key: torch.Tensor, strength: float, sigma_end: float, region: dict | None = None,
                 mode: CanvasMode = CanvasMode.FOLLOW):
        self.key = key.detach().float().cpu()
        self.strength = float(strength)
        self.sigma_end = float(sigma_end)
        self.mode = CanvasMode(mode)
        self.region = dict(region or {})
        if self.mode is CanvasMode.ELLIPSE and not self.region:
            raise ValueError("the fixed-ellipse mode needs a region (center_x, center_y, width, height, feather)")

    def weight(self, denoised: torch.Tensor) -> torch.Tensor:
        if self.mode is CanvasMode.FOLLOW:
            return follow_background(denoised, self.key)
        h, w = denoised.shape[-2:]
        return background_weight(h, w, device=denoised.device, **self.region)

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = args["sigma"]
        s = float(sigma.max()) if torch.is_tensor(sigma) else float(sigma)
        if self.strength <= 0 or s < self.sigma_end:
            return denoised
        return guide_denoised(denoised, self.key, self.weight(denoised), self.strength)
