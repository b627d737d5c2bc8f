"""Foreground colours for matting pairs that have only a photo and its alpha.

A photo is I = a F + (1 - a) B with an unknown background B; compositing the photo itself onto a green
canvas would carry its old background into every semi-transparent pixel (hair, glass, soft edges).
`estimate_foreground` recovers F by multi-level foreground estimation (Germer et al., "Fast Multi-Level
Foreground Estimation", ICPR 2020): per pixel, F and B minimise

    (a F + (1 - a) B - I)^2 + sum over the 4 neighbours j of w_ij (|F - F_j|^2 + |B - B_j|^2),
    w_ij = eps + omega |a - a_j|,

solved coarse to fine: the image pyramid goes from 1x1 to full size, each level starting from the
upsampled previous solution and running a few Jacobi sweeps of the closed-form 2x2 per-pixel solution.
Written from the paper's equations; plain numpy and OpenCV, float32.
"""
from __future__ import annotations

import math

import cv2
import numpy as np


def _neighbour_sums(x: np.ndarray, w: list[np.ndarray], shifts) -> np.ndarray:
    out = np.zeros_like(x)
    for wi, (dy, dx) in zip(w, shifts):
        out += wi[..., None] * _shift(x, dy, dx)
    return out


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """x moved by (dy, dx) with edge replication: out[y, x] = x[y + dy, x + dx] (clamped)."""
    h, w = x.shape[:2]
    ys = np.clip(np.arange(h) + dy, 0, h - 1)
    xs = np.clip(np.arange(w) + dx, 0, w - 1)
    return x[ys][:, xs]


SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _sweeps(image, alpha, fg, bg, iterations: int, eps: float, omega: float):
    a = alpha[..., None]
    weights = [eps + omega * np.abs(alpha - _shift(alpha, dy, dx)) for dy, dx in SHIFTS]
    wsum = sum(weights)[..., None]
    a00 = a * a + wsum
    a01 = a * (1 - a)
    a11 = (1 - a) * (1 - a) + wsum
    det = a00 * a11 - a01 * a01
    for _ in range(iterations):
        r0 = a * image + _neighbour_sums(fg, weights, SHIFTS)
        r1 = (1 - a) * image + _neighbour_sums(bg, weights, SHIFTS)
        fg = np.clip((a11 * r0 - a01 * r1) / det, 0, 1)
        bg = np.clip((a00 * r1 - a01 * r0) / det, 0, 1)
    return fg, bg


def estimate_foreground(image: np.ndarray, alpha: np.ndarray, eps: float = 5e-3, omega: float = 1e-1,
                        small_size: int = 32, small_iterations: int = 10, big_iterations: int = 2) -> np.ndarray:
    """Foreground colours (HxWx3 float32 in [0, 1]) of `image` (HxWx3) given its `alpha` (HxW)."""
    image = np.asarray(image, np.float32)
    alpha = np.clip(np.asarray(alpha, np.float32), 0, 1)
    if image.ndim != 3 or image.shape[2] != 3 or alpha.shape != image.shape[:2]:
        raise ValueError(f"estimate_foreground needs an HxWx3 image and an HxW alpha, got {image.shape} and "
                         f"{alpha.shape}")
    h, w = alpha.shape
    levels = max(1, int(math.ceil(math.log2(max(h, w)))))
    fg = image.mean(axis=(0, 1), keepdims=True)
    bg = fg.copy()
    for level in range(levels + 1):
        lh = max(1, round(h ** (level / levels)))
        lw = max(1, round(w ** (level / levels)))
        img_l = cv2.resize(image, (lw, lh), interpolation=cv2.INTER_AREA).reshape(lh, lw, 3)
        a_l = cv2.resize(alpha, (lw, lh), interpolation=cv2.INTER_AREA).reshape(lh, lw)
        fg = cv2.resize(fg, (lw, lh), interpolation=cv2.INTER_NEAREST).reshape(lh, lw, 3)
        bg = cv2.resize(bg, (lw, lh), interpolation=cv2.INTER_NEAREST).reshape(lh, lw, 3)
        its = small_iterations if min(lh, lw) <= small_size else big_iterations
        fg, bg = _sweeps(img_l, a_l, fg, bg, its, eps, omega)
    return np.ascontiguousarray(fg, dtype=np.float32)
