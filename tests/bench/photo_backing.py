"""A photographic green-screen generator for the keying benchmark, written independently of
models/synthetic.py (which GreenPost was designed against).

It models a camera looking at a cloth backing, in linear light, then the camera's output pipeline:

1. Cloth: the dye colour (a chroma-key green, or blue) times the illumination:
   - lens vignetting: cos^4 falloff around an off-centre optical axis, strength varied per shot;
   - cloth wrinkles: luminance folds at several scales (long soft folds along a random hang direction,
     medium creases, fine weave texture), multiplicative, up to ~+-15% at the coarsest scale;
   - colour-temperature drift: two light sources of different colour temperature whose mix varies
     smoothly across the frame (per-channel white-balance gains, ~3000 K to ~7500 K);
   - a soft contact shadow below the object (the light is occluded where the object sits).
2. Subject: the straight foreground F (linear) with the backing's bounce light added near its edges
   (spill, stronger where the object is thin), composited by coverage alpha: aF + (1-a)B.
3. Motion blur: a short line kernel (camera shake, 0-4 px at a random angle) applied to the premultiplied
   foreground aF, to (1-a)B and to alpha, so the ground truth stays exact (alpha_gt = blur(a),
   F_gt = blur(aF) / blur(a)).
4. Sensor: shot noise (variance proportional to the signal) plus read noise, drawn per raw channel, then
   mixed by a colour-correction matrix (so the noise is correlated across channels, as demosaiced camera
   noise is) and slightly correlated between neighbours (demosaicing), then sRGB encoding.
5. JPEG with 4:2:0 chroma subsampling (PIL, subsampling=2), quality 80-95.

All randomness comes from the seed: the same seed gives the same arrays. Arrays are float32 in [0, 1]:
image/foreground HxWx3 (sRGB), alpha HxW.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class PhotoShot:
    image: np.ndarray       # HxWx3 sRGB, what the camera recorded
    alpha: np.ndarray       # HxW ground truth (after motion blur)
    foreground: np.ndarray  # HxWx3 sRGB ground truth straight foreground (no spill)


# Chroma-key dye colours (sRGB), roughly those of common green and blue screen fabrics and paints.
GREEN_DYES = ((0.0, 0.69, 0.25), (0.20, 0.72, 0.28), (0.29, 0.63, 0.24), (0.05, 0.56, 0.30))
BLUE_DYES = ((0.0, 0.28, 0.73), (0.10, 0.30, 0.62))


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * np.power(x, 1 / 2.4) - 0.055).astype(np.float32)


def _kelvin_gains(kelvin: float) -> np.ndarray:
    """Relative RGB of a black-body light (normalised to green), Planck's law sampled at the
    dominant wavelengths of the three channels (a coarse but monotone model of white balance)."""
    wl = np.array([600e-9, 540e-9, 460e-9])
    h, c, k = 6.626e-34, 2.998e8, 1.381e-23
    radiance = 1.0 / (wl ** 5 * (np.exp(h * c / (wl * k * kelvin)) - 1.0))
    return (radiance / radiance[1]).astype(np.float32)


def _band_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about `cell` pixels across (white noise on a coarse
    lattice, cubic interpolation)."""
    gh, gw = int(np.ceil(h / cell)) + 3, int(np.ceil(w / cell)) + 3
    lattice = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(lattice, (int(round(gw * cell)), int(round(gh * cell))), interpolation=cv2.INTER_CUBIC)
    oy, ox = int(rng.integers(0, max(1, big.shape[0] - h))), int(rng.integers(0, max(1, big.shape[1] - w)))
    out = big[oy:oy + h, ox:ox + w]
    if out.shape != (h, w):  # tiny images
        out = cv2.resize(big, (w, h), interpolation=cv2.INTER_LINEAR)
    return (out - out.mean()) / max(float(out.std()), 1e-6)


def _wrinkles(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multiplicative luminance of hanging cloth: folds along a hang direction at three scales."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    size = float(max(h, w))
    ang = rng.uniform(-0.35, 0.35)  # folds hang roughly vertically
    across = xx * np.cos(ang) + yy * np.sin(ang)
    # long folds: a few sinusoids across the hang direction, their phase wandering down the cloth
    lum = np.zeros((h, w), np.float32)
    for _ in range(3):
        period = rng.uniform(0.15, 0.45) * size
        wander = _band_noise(rng, h, w, size / 3) * rng.uniform(0.5, 1.5)
        lum += rng.uniform(0.02, 0.05) * np.sin(2 * np.pi * across / period + wander + rng.uniform(0, 2 * np.pi))
    lum += rng.uniform(0.01, 0.03) * _band_noise(rng, h, w, max(4.0, size / 12))   # creases
    lum += rng.uniform(0.003, 0.01) * _band_noise(rng, h, w, 1.5)                  # weave
    return np.exp(lum).astype(np.float32)


def _vignette(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65)
    focal = max(h, w) * rng.uniform(0.8, 1.6)  # shorter focal length = stronger falloff
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / focal ** 2
    return (1.0 / (1.0 + r2) ** 2).astype(np.float32)  # cos^4 of the off-axis angle


def _temperature_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 white-balance gains: a smooth mix of two lights of different colour temperature, the
    camera balanced for their average."""
    k1, k2 = rng.uniform(3000, 4500), rng.uniform(5500, 7500)
    g1, g2 = _kelvin_gains(k1), _kelvin_gains(k2)
    balance = 2.0 / (g1 + g2)
    mix = 1.0 / (1.0 + np.exp(-1.5 * _band_noise(rng, h, w, max(h, w) / 1.5)))
    gains = (mix[..., None] * g1 + (1 - mix[..., None]) * g2) * balance
    return gains.astype(np.float32)


def _motion_kernel(rng: np.random.Generator) -> np.ndarray | None:
    length = rng.uniform(0.0, 4.0)
    if length < 1.0:
        return None
    n = int(np.ceil(length)) * 2 + 1
    ker = np.zeros((n, n), np.float32)
    ang = rng.uniform(0, np.pi)
    c = n // 2
    for t in np.linspace(-length / 2, length / 2, 4 * n):
        x, y = c + t * np.cos(ang), c + t * np.sin(ang)
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        for dy, dx, wgt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy),
                            (1, 1, fx * fy)):
            if 0 <= y0 + dy < n and 0 <= x0 + dx < n:
                ker[y0 + dy, x0 + dx] += wgt
    return ker / ker.sum()


def _sensor(rng: np.random.Generator, lin: np.ndarray) -> np.ndarray:
    """Shot + read noise per raw channel, correlated by a colour-correction matrix and demosaicing."""
    ccm = np.array([[1.6, -0.45, -0.15], [-0.25, 1.5, -0.25], [-0.05, -0.5, 1.55]], np.float32)
    raw = np.clip(lin @ np.linalg.inv(ccm).T, 0, None)
    iso = rng.uniform(0.5, 2.0)
    std = np.sqrt(raw * (2.0e-4 * iso) + (3.0e-5 * iso) ** 2 * 100).astype(np.float32)
    noise = rng.standard_normal(raw.shape).astype(np.float32) * std
    noise = cv2.GaussianBlur(noise, (0, 0), 0.6) * 1.6  # demosaicing spreads noise over neighbours
    return np.clip((raw + noise) @ ccm.T, 0, 1).astype(np.float32)


def _jpeg420(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, "JPEG", quality=int(quality),
                                                                            subsampling=2)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255.0


def shoot(fg_srgb: np.ndarray, alpha: np.ndarray, seed: int, dye: tuple[float, float, float] | None = None
          ) -> PhotoShot:
    """Photograph the object (straight sRGB foreground + coverage alpha) in front of a cloth backing."""
    rng = np.random.default_rng(seed * 7 + 3)
    h, w = alpha.shape
    dye_rgb = np.asarray(GREEN_DYES[int(rng.integers(len(GREEN_DYES)))] if dye is None else dye, np.float32)
    exposure = rng.uniform(0.75, 1.05)
    light = _vignette(rng, h, w) * _wrinkles(rng, h, w)
    # contact shadow: the object occludes part of the light reaching the cloth just below it
    drop = max(1, int(h * rng.uniform(0.02, 0.06)))
    occ = np.zeros_like(alpha)
    occ[drop:] = alpha[:-drop]
    occ = cv2.GaussianBlur(occ, (0, 0), max(1.0, min(h, w) * rng.uniform(0.02, 0.05)))
    light = light * (1.0 - rng.uniform(0.15, 0.45) * occ)
    gains = _temperature_field(rng, h, w)
    backing = srgb_to_linear(dye_rgb)[None, None, :] * (exposure * light)[..., None] * gains

    f_lin = srgb_to_linear(fg_srgb) * gains * exposure
    # bounce light from the cloth onto the object, strongest at thin/edge parts
    body = cv2.GaussianBlur(alpha, (0, 0), max(1.0, min(h, w) / 50))
    bounce = rng.uniform(0.05, 0.25) * np.clip(1.0 - body, 0, 1)[..., None] * backing
    f_lit = np.clip(f_lin + bounce, 0, 1)

    a = alpha[..., None]
    pre_f = a * f_lit
    pre_f_true = a * f_lin
    pre_b = (1 - a) * backing
    ker = _motion_kernel(rng)
    if ker is not None:
        pre_f, pre_f_true, pre_b = (cv2.filter2D(x, -1, ker, borderType=cv2.BORDER_REFLECT)
                                    for x in (pre_f, pre_f_true, pre_b))
        alpha = np.clip(cv2.filter2D(alpha, -1, ker, borderType=cv2.BORDER_REFLECT), 0, 1)
    lin = _sensor(rng, pre_f + pre_b)
    image = _jpeg420(linear_to_srgb(lin), int(rng.integers(80, 96)))
    # ground-truth straight foreground, unlit by the bounce, in the camera's sRGB (same gains/exposure)
    fg_true = pre_f_true / np.maximum(alpha[..., None], 1e-6)
    fg_true = np.where(alpha[..., None] > 1e-6, fg_true, f_lin)
    return PhotoShot(image=image, alpha=alpha.astype(np.float32), foreground=linear_to_srgb(fg_true))
