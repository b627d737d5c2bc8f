"""Procedural green-screen composites with exactly known alpha and foreground.

Used by the tests (error bounds against ground truth), by the demo's sample image and by the
trainer's `tiny` preset. Everything is seeded: the same seed gives the same arrays.

Arrays are float32 numpy, HxWx3 for colour and HxW for alpha, in [0, 1].
The composite follows I = a*F_spilled + (1-a)*B, where F_spilled is the true foreground tinted by the
backing near the object's edge (green spill); the ground truth foreground is the unspilled F.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Realism:
    """How far a generated green screen departs from a flat, clean one."""

    falloff: float = 0.35      # fraction of brightness lost at the darkest corner of the backing
    shadow: float = 0.35       # darkening of the contact shadow under the object
    spill: float = 0.25        # how much backing colour bleeds into the object near its edge
    noise: float = 0.01        # std of per-pixel sensor noise
    blur: float = 0.0          # gaussian softening (sigma, pixels) of the whole photo
    jpeg_quality: int = 0      # 0 = no JPEG round trip, else its quality


FLAT = Realism(falloff=0.0, shadow=0.0, spill=0.0, noise=0.0)
REALISTIC = Realism(falloff=0.35, shadow=0.35, spill=0.25, noise=0.012, blur=0.6, jpeg_quality=90)


@dataclass
class Composite:
    image: np.ndarray       # HxWx3, what the camera (or the model) sees
    alpha: np.ndarray       # HxW, ground truth
    foreground: np.ndarray  # HxWx3, ground truth straight foreground (no spill)
    backing: np.ndarray     # HxWx3, the backing plate behind the object


def _smooth_field(rng: np.random.Generator, h: int, w: int, channels: int, scale: float) -> np.ndarray:
    """Low-frequency random field in [0, 1] (bicubic upsampling of a coarse grid)."""
    gh, gw = max(2, int(h / scale) + 2), max(2, int(w / scale) + 2)
    coarse = rng.random((gh, gw, channels)).astype(np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(field.reshape(h, w, channels), 0.0, 1.0)


def random_object(h: int, w: int, seed: int, greenish: bool = False, hair: bool = True,
                  translucent: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A random object: (foreground HxWx3, alpha HxW) with soft edges, strands and see-through parts."""
    rng = np.random.default_rng(seed)
    ss = 4  # supersampling for sub-pixel edges and strands
    H, W = h * ss, w * ss
    canvas = np.zeros((H, W), np.float32)
    cy, cx = H * rng.uniform(0.4, 0.6), W * rng.uniform(0.4, 0.6)
    for _ in range(rng.integers(2, 5)):
        ey = cy + rng.normal(0, H * 0.08)
        ex = cx + rng.normal(0, W * 0.08)
        ay, ax = H * rng.uniform(0.1, 0.25), W * rng.uniform(0.1, 0.25)
        cv2.ellipse(canvas, (int(ex), int(ey)), (int(ax), int(ay)), float(rng.uniform(0, 180)), 0, 360, 1.0, -1,
                    cv2.LINE_AA)
    if hair:
        n = int(rng.integers(20, 50))
        for _ in range(n):
            ang = rng.uniform(0, 2 * np.pi)
            r0 = rng.uniform(0.12, 0.2) * min(H, W)
            length = rng.uniform(0.08, 0.22) * min(H, W)
            pts = []
            bend = rng.normal(0, 0.4)
            for t in np.linspace(0, 1, 12):
                a = ang + bend * t * t
                rr = r0 + length * t
                pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
            pts = np.array(pts, np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [pts], False, float(rng.uniform(0.5, 1.0)), int(rng.integers(1, 3)), cv2.LINE_AA)
    alpha = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    edge_sigma = rng.uniform(0.3, 1.2)
    alpha = cv2.GaussianBlur(alpha, (0, 0), edge_sigma)
    if translucent:
        mask = np.zeros((h, w), np.float32)
        cv2.ellipse(mask, (int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.35, 0.65))),
                    (max(1, int(w * 0.08)), max(1, int(h * 0.06))), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
        mask = cv2.GaussianBlur(mask, (0, 0), 1.5)
        alpha = alpha * (1 - mask * rng.uniform(0.3, 0.6))
    alpha = np.clip(alpha, 0.0, 1.0).astype(np.float32)

    base = rng.uniform(0.15, 0.9, 3).astype(np.float32)
    if greenish:
        base = np.array([rng.uniform(0.2, 0.4), rng.uniform(0.45, 0.6), rng.uniform(0.2, 0.4)], np.float32)
    else:
        base[1] = min(base[1], max(base[0], base[2]))  # most objects are not green-dominant
    tex = _smooth_field(rng, h, w, 3, scale=max(4.0, min(h, w) / 6))
    fg = np.clip(base[None, None, :] * 0.7 + 0.3 * tex, 0, 1).astype(np.float32)
    if greenish:
        fg[..., 1] = np.maximum(fg[..., 1], np.maximum(fg[..., 0], fg[..., 2]) + 0.05)
    return fg, alpha


def green_backing(h: int, w: int, seed: int, realism: Realism = REALISTIC,
                  key: tuple[float, float, float] | None = None) -> np.ndarray:
    """An uneven green backing plate: key colour times a smooth light falloff."""
    rng = np.random.default_rng(seed + 7919)
    if key is None:
        key = (rng.uniform(0.05, 0.3), rng.uniform(0.6, 0.9), rng.uniform(0.05, 0.35))
    key_arr = np.asarray(key, np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ly, lx = rng.uniform(-0.2, 1.2) * h, rng.uniform(-0.2, 1.2) * w
    d = np.sqrt(((yy - ly) / max(h, 1)) ** 2 + ((xx - lx) / max(w, 1)) ** 2)
    light = 1.0 - realism.falloff * np.clip(d / 1.2, 0, 1)
    light = light * (1.0 - 0.3 * realism.falloff * (_smooth_field(rng, h, w, 1, max(8.0, min(h, w) / 3))[..., 0] - 0.5))
    return np.clip(key_arr[None, None, :] * light[..., None], 0, 1).astype(np.float32)


def composite(fg: np.ndarray, alpha: np.ndarray, backing: np.ndarray, seed: int,
              realism: Realism = REALISTIC) -> np.ndarray:
    """I = a*F_spilled + (1-a)*B_shadowed, then softening, noise and JPEG as `realism` says."""
    rng = np.random.default_rng(seed + 104729)
    h, w = alpha.shape
    a = alpha[..., None]
    b = backing.copy()
    if realism.shadow > 0:
        shift = max(1, h // 20)
        sh = np.zeros_like(alpha)
        sh[shift:] = alpha[:-shift] if shift < h else 0
        sh = cv2.GaussianBlur(sh, (0, 0), max(1.0, min(h, w) / 30))
        b = b * (1 - realism.shadow * np.clip(sh, 0, 1))[..., None]
    f = fg
    if realism.spill > 0:
        inner = cv2.GaussianBlur(alpha, (0, 0), max(1.0, min(h, w) / 60))
        near_edge = np.clip(1 - inner, 0, 1)[..., None]
        f = np.clip(fg + realism.spill * near_edge * (b - fg) * np.array([0.3, 1.0, 0.3], np.float32), 0, 1)
    img = a * f + (1 - a) * b
    if realism.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), realism.blur)
    if realism.noise > 0:
        img = img + rng.normal(0, realism.noise, img.shape).astype(np.float32)
    img = np.clip(img, 0, 1).astype(np.float32)
    if realism.jpeg_quality:
        ok, buf = cv2.imencode(".jpg", (img[..., ::-1] * 255 + 0.5).astype(np.uint8),
                               [cv2.IMWRITE_JPEG_QUALITY, int(realism.jpeg_quality)])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0
    return img


def make_composite(h: int, w: int, seed: int, realism: Realism = REALISTIC, greenish: bool = False,
                   hair: bool = True, translucent: bool = True) -> Composite:
    """One seeded sample: random object over an uneven green backing."""
    fg, alpha = random_object(h, w, seed, greenish=greenish, hair=hair, translucent=translucent)
    backing = green_backing(h, w, seed, realism)
    image = composite(fg, alpha, backing, seed, realism)
    return Composite(image=image, alpha=alpha, foreground=fg, backing=backing)
