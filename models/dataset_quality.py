"""Per-sample annotation and quality scores for the dataset factory (make_dataset.py).

Every function takes float arrays in [0, 1]: `alpha` (H, W) opacity (1 = object), `rgb` (H, W, 3) the
green original as generated, `fg` (H, W, 3) the straight despilled foreground. numpy + OpenCV only.

Scores (all measured, none faked; `reject_reasons` turns them into filter decisions):
- backing_residual: mean colour distance (RGB, 0..sqrt(3)) of the clear backing (alpha < 0.02) from the
  key colour; high when the model painted a textured or off-key background.
- head_mad / head_iou: agreement of the matting head's alpha with GreenPost's (mean absolute difference,
  IoU of alpha > 0.5); only when the workflow has a head.
- border_touch: share of the image's border pixels that the object covers (alpha > 0.5).
- objects: connected components of alpha > 0.5 larger than 0.2 % of the image.
- coverage: mean alpha (empty or tiny object when low).
- green_object: share of the solid object (alpha > 0.95) whose original colour is key-dominant
  (green excess > 0.15): such objects cannot be told from the backing by colour.
- phash: 64-bit DCT perceptual hash of the object over mid grey; near-duplicates differ in few bits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

TRIMAP_VALUES = (0, 128, 255)
DEFAULT_KEY = (0.0, 0.694, 0.251)  # #00b140, the workflows' default backing colour
_SOLID = 0.99
_CLEAR = 0.01


def _alpha(alpha) -> np.ndarray:
    a = np.asarray(alpha, np.float32)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"alpha has shape {a.shape}: expected a non-empty (H, W) array in 0..1")
    return a


def _rgb(rgb, shape, name: str) -> np.ndarray:
    x = np.asarray(rgb, np.float32)
    if x.shape != (*shape, 3):
        raise ValueError(f"{name} has shape {x.shape}: expected {(*shape, 3)} (the alpha's size, RGB)")
    return x


def trimap(alpha, band: int) -> np.ndarray:
    """uint8 trimap: 255 solid object (alpha >= 0.99), 0 clear backing (alpha <= 0.01), 128 the rest and
    everything within `band` pixels of it (a square neighbourhood)."""
    a = _alpha(alpha)
    if not isinstance(band, (int, np.integer)) or band < 0:
        raise ValueError(f"trimap band {band!r}: expected a whole number of pixels >= 0")
    unknown = ((a > _CLEAR) & (a < _SOLID)).astype(np.uint8)
    # Where solid meets clear directly (a hard edge) the band must still straddle the edge.
    solid = (a >= _SOLID).astype(np.uint8)
    edge = cv2.morphologyEx(solid, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    unknown = np.maximum(unknown, edge)
    if band > 0:
        unknown = cv2.dilate(unknown, np.ones((2 * band + 1, 2 * band + 1), np.uint8))
    out = np.where(a >= _SOLID, 255, 0).astype(np.uint8)
    out[unknown.astype(bool)] = 128
    return out


def backing_residual(rgb, alpha, key=DEFAULT_KEY) -> float:
    """Mean RGB distance of the clear backing from `key`; NaN when no pixel is clear backing."""
    a = _alpha(alpha)
    x = _rgb(rgb, a.shape, "rgb")
    clear = a < 0.02
    if not clear.any():
        return float("nan")
    d = np.linalg.norm(x[clear] - np.asarray(key, np.float32), axis=-1)
    return float(d.mean())


def head_agreement(head_alpha, alpha) -> tuple[float, float]:
    """(mean |head - alpha|, IoU of the two at 0.5); IoU is 1 when both are empty."""
    a = _alpha(alpha)
    h = _alpha(head_alpha)
    if h.shape != a.shape:
        raise ValueError(f"head alpha {h.shape} and GreenPost alpha {a.shape} differ in size")
    inter = np.logical_and(h > 0.5, a > 0.5).sum()
    union = np.logical_or(h > 0.5, a > 0.5).sum()
    return float(np.abs(h - a).mean()), float(inter / union) if union else 1.0


def border_touch(alpha) -> float:
    a = _alpha(alpha) > 0.5
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return float(border.mean())


def object_count(alpha, min_area: float = 0.002) -> int:
    """Connected components (8-connected) of alpha > 0.5 covering at least `min_area` of the image."""
    a = (_alpha(alpha) > 0.5).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(a, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    return int((areas >= min_area * a.size).sum())


def green_object(rgb, alpha, key=DEFAULT_KEY, excess: float = 0.15) -> float:
    """Share of the solid object whose original colour is dominated by the key's channel."""
    a = _alpha(alpha)
    x = _rgb(rgb, a.shape, "rgb")
    solid = a > 0.95
    if not solid.any():
        return 0.0
    p = int(np.argmax(key))
    others = [c for c in range(3) if c != p]
    ex = x[..., p] - np.maximum(x[..., others[0]], x[..., others[1]])
    return float((ex[solid] > excess).mean())


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(fg, alpha) -> int:
    """64-bit pHash: the object over mid grey, 32x32 grey, DCT, the 8x8 low frequencies vs their median."""
    a = _alpha(alpha)
    f = _rgb(fg, a.shape, "fg")
    comp = f * a[..., None] + 0.5 * (1.0 - a[..., None])
    grey = comp @ np.array([0.299, 0.587, 0.114], np.float32)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float64)
    low = (_DCT32 @ small @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return bin(int(a) ^ int(b)).count("1")


@dataclass(frozen=True)
class Thresholds:
    """Filter limits; a sample beyond any of them goes to rejected/ with the reason."""

    max_backing_residual: float = 0.35
    min_head_iou: float = 0.5
    max_border_touch: float = 0.02
    max_objects: int = 1
    min_coverage: float = 0.005
    max_green_object: float = 0.3
    max_phash_distance: int = 4

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict:
        return asdict(self)


def score_sample(rgb, fg, alpha, head_alpha=None, key=DEFAULT_KEY) -> dict:
    """Every score of one sample (JSON-ready; the hash as 16 hex digits)."""
    a = _alpha(alpha)
    scores = {
        "backing_residual": backing_residual(rgb, a, key),
        "border_touch": border_touch(a),
        "objects": object_count(a),
        "coverage": float(a.mean()),
        "green_object": green_object(rgb, a, key),
        "phash": f"{perceptual_hash(fg, a):016x}",
    }
    if head_alpha is not None:
        scores["head_mad"], scores["head_iou"] = head_agreement(head_alpha, a)
    return scores


def reject_reasons(scores: dict, limits: Thresholds) -> list[str]:
    """Human-readable reasons to reject (empty: keep). Near-duplicates are checked by the caller."""
    out = []
    if scores["coverage"] < limits.min_coverage:
        out.append(f"empty or tiny object: coverage {scores['coverage']:.4f} < {limits.min_coverage}")
    if scores["objects"] > limits.max_objects:
        out.append(f"{scores['objects']} objects > {limits.max_objects}")
    if scores["border_touch"] > limits.max_border_touch:
        out.append(f"object touches the border: {scores['border_touch']:.3f} of the border > "
                   f"{limits.max_border_touch}")
    res = scores["backing_residual"]
    if not math.isnan(res) and res > limits.max_backing_residual:
        out.append(f"backing residual {res:.3f} > {limits.max_backing_residual} (background far from the key)")
    if scores["green_object"] > limits.max_green_object:
        out.append(f"green-coloured object: {scores['green_object']:.2f} of it key-coloured > "
                   f"{limits.max_green_object}")
    if "head_iou" in scores and scores["head_iou"] < limits.min_head_iou:
        out.append(f"matting head and GreenPost disagree: IoU {scores['head_iou']:.2f} < {limits.min_head_iou}")
    return out


def nearest_duplicate(phash_hex: str, seen: dict[str, int], max_distance: int) -> str | None:
    """Id in `seen` (id -> hash) whose hash is within `max_distance` bits of `phash_hex`, else None."""
    h = int(phash_hex, 16)
    for other_id, other in seen.items():
        if hamming(h, other) <= max_distance:
            return other_id
    return None
