"""Procedural objects for the refiner's training data (training/refiner_data.py).

Each builder takes a `Ctx` (random stream, size, key colour) and returns (alpha (h, w), premultiplied
colour (h, w, 3)), float32. Shapes are drawn on a 4x supersampled 8-bit canvas with anti-aliasing and
area-averaged down, so alpha is true pixel coverage: interiors are exactly 1, untouched pixels exactly 0.
Parts of an object are layers joined with the premultiplied "over" operator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SS = 4      # supersampling factor of the drawing canvases
SHIFT = 3   # fractional bits of the drawing coordinates (sub-pixel placement at the supersampled scale)
FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX,
         cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, cv2.FONT_HERSHEY_SCRIPT_COMPLEX, cv2.FONT_HERSHEY_PLAIN)
HAIR_COLOURS = np.array([[0.06, 0.045, 0.035], [0.2, 0.12, 0.07], [0.38, 0.24, 0.13], [0.6, 0.28, 0.12],
                         [0.85, 0.7, 0.45], [0.92, 0.85, 0.7], [0.75, 0.75, 0.74], [0.45, 0.4, 0.36]], np.float32)


# ----------------------------------------------------------------------------------------------- noise

def fbm(rng: np.random.Generator, h: int, w: int, scale: float, octaves: int = 4, gain: float = 0.5,
        channels: int = 1) -> np.ndarray:
    """Fractal noise, roughly zero-mean and unit std: octaves of smoothly upsampled white noise, the
    coarsest with cells `scale` pixels wide. Returns (h, w) or (h, w, channels).
    Each octave: bicubic upsampling of the grid by up to 8 (small), then bilinear to the final size."""
    out = np.zeros((h, w, channels), np.float32)
    amp, total, s = 1.0, 0.0, float(scale)
    for _ in range(octaves):
        gh, gw = max(2, int(h / s) + 3), max(2, int(w / s) + 3)
        g = rng.standard_normal((gh, gw, channels)).astype(np.float32)
        k = int(min(8, max(1, s)))
        fine = cv2.resize(g, (gw * k, gh * k), interpolation=cv2.INTER_CUBIC) if k > 1 else g
        z = k / s  # fine-grid cells per output pixel
        ox, oy = rng.uniform(0, 1) * k, rng.uniform(0, 1) * k
        mat = np.float32([[z, 0, ox], [0, z, oy]])
        up = cv2.warpAffine(fine, mat, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REFLECT)
        out += amp * up.reshape(h, w, channels)
        total += amp * amp
        amp *= gain
        s /= 2.0
        if s < 1.0:
            break
    out /= math.sqrt(total)
    return out[..., 0] if channels == 1 else out


def hsv_rgb(h: float, s: float, v: float) -> np.ndarray:
    """HSV (hue in degrees) to an RGB float32 triple."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = v - c
    return np.array([r + m, g + m, b + m], np.float32)



@dataclass
class Ctx:
    rng: np.random.Generator
    h: int
    w: int
    key: np.ndarray            # nominal key colour (3,)
    key_hue: float             # its hue in degrees
    key_tinted: bool = False   # objects take the key's hue (the hard "green object on green" case)

    @property
    def m(self) -> float:
        return float(max(self.h, self.w))

    def colour(self, sat=(0.0, 0.9), val=(0.1, 0.95)) -> np.ndarray:
        """An object colour: away from the key's hue, or of the key's own hue when key_tinted."""
        r = self.rng
        if self.key_tinted:
            hue = self.key_hue + r.uniform(-25, 25)
            s, v = r.uniform(0.2, 1.0), r.uniform(0.12, 0.95)
            kv = float(self.key.max())
            if abs(v - kv) < 0.12:  # distinguishable from the backing by brightness at least
                v = float(np.clip(kv + math.copysign(r.uniform(0.12, 0.3), v - kv), 0.08, 1.0))
            return hsv_rgb(hue, s, v)
        hue = self.key_hue + r.choice([-1, 1]) * r.uniform(50, 180)
        return hsv_rgb(hue, r.uniform(*sat), r.uniform(*val))

    def point(self, margin: float = 0.1) -> np.ndarray:
        return self.rng.uniform(margin, 1 - margin, 2) * np.array([self.w, self.h], np.float32)


# ----------------------------------------------------------------------------------------------- drawing

def to_pts(xy: np.ndarray) -> np.ndarray:
    """Final-pixel coordinates (x, y), pixel i spanning [i, i+1), to fixed-point supersampled ones."""
    return np.round((np.asarray(xy, np.float64) * SS - 0.5) * (1 << SHIFT)).astype(np.int32).reshape(-1, 1, 2)


class Cover:
    """A supersampled 8-bit canvas; `alpha()` is its area-averaged coverage at the final size."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.c = np.zeros((h * SS, w * SS), np.uint8)

    def lines(self, curves, width: float, closed: bool = False, value: int = 255) -> "Cover":
        """Anti-aliased polylines `width` pixels wide; curves: a list of (K, 2) arrays or one (N, K, 2)."""
        if isinstance(curves, np.ndarray) and curves.ndim == 3:
            pts = to_pts(curves).reshape(curves.shape[0], curves.shape[1], 1, 2)
            curves = list(pts)
        else:
            curves = [to_pts(c) for c in curves]
        if curves:
            cv2.polylines(self.c, curves, closed, value, max(1, int(round(width * SS))), cv2.LINE_AA, SHIFT)
        return self

    def fill(self, polys, value: int = 255) -> "Cover":
        polys = [to_pts(p) for p in polys]
        if polys:
            cv2.fillPoly(self.c, polys, value, cv2.LINE_AA, SHIFT)
        return self

    def alpha(self) -> np.ndarray:
        a = cv2.resize(self.c, (self.w, self.h), interpolation=cv2.INTER_AREA)
        return a.astype(np.float32) * (1.0 / 255.0)


class Layers:
    """Back-to-front accumulation of layers with the premultiplied over operator."""

    def __init__(self, h: int, w: int):
        self.a = np.zeros((h, w), np.float32)
        self.p = np.zeros((h, w, 3), np.float32)

    def over(self, alpha: np.ndarray, colour) -> None:
        """Put a layer of coverage `alpha` (h, w) in 0..1 and straight colour (3,) or (h, w, 3) on top."""
        col = np.asarray(colour, np.float32)
        keep = 1.0 - alpha
        self.p *= keep[..., None]
        self.p += np.clip(col, 0.0, 1.0) * alpha[..., None]
        self.a *= keep
        self.a += alpha

    def over_premult(self, alpha: np.ndarray, premult: np.ndarray) -> None:
        keep = 1.0 - alpha
        self.p *= keep[..., None]
        self.p += premult
        self.a *= keep
        self.a += alpha

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return np.clip(self.a, 0, 1), np.clip(self.p, 0, 1)


def bezier(p: np.ndarray, n: int = 32) -> np.ndarray:
    """Points (n, 2) of the cubic Bezier curve with control points p (4, 2)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t * t * p[2] + t ** 3 * p[3]


def blob(rng: np.random.Generator, centre, radius: float, aspect: float = 1.0, rough: float = 0.25,
         n: int = 96) -> np.ndarray:
    """A star-shaped closed outline (n, 2): radius modulated by a few random harmonics."""
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones_like(th)
    for k in range(2, 7):
        r += rough / k * rng.normal() * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.3, None) * radius
    rot = rng.uniform(0, np.pi)
    x, y = r * np.cos(th) * aspect, r * np.sin(th)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([centre[0] + c * x - s * y, centre[1] + s * x + c * y], 1)


def grow(rng: np.random.Generator, roots: np.ndarray, angles: np.ndarray, lengths: np.ndarray, k: int = 12,
         curl: float = 0.05, wiggle: float = 0.04, gravity: float = 0.0) -> np.ndarray:
    """Curves (N, k, 2) grown from roots: heading turns by a per-curve curvature plus noise, and toward
    +y (down) by `gravity` per step."""
    n = len(roots)
    pts = np.empty((n, k, 2), np.float64)
    pts[:, 0] = roots
    ang = angles.astype(np.float64).copy()
    bend = rng.normal(0, curl, n)
    step = lengths / (k - 1)
    for i in range(1, k):
        ang = ang + bend + rng.normal(0, wiggle, n)
        if gravity:
            ang = ang + gravity * np.cos(ang)  # turns toward pi/2 (down) from either side
        pts[:, i] = pts[:, i - 1] + step[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
    return pts


def edge_points(rng: np.random.Generator, alpha: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n random points on the outline of alpha > 0.5 (x, y) and their outward unit normals."""
    mask = (alpha > 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((0, 2)), np.zeros((0, 2))
    pts = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    pick = pts[rng.integers(0, len(pts), n)] + 0.5 + rng.uniform(-0.5, 0.5, (n, 2))
    sm = cv2.GaussianBlur(alpha, (0, 0), 2.0)
    gx, gy = cv2.Sobel(sm, cv2.CV_32F, 1, 0), cv2.Sobel(sm, cv2.CV_32F, 0, 1)
    xi = np.clip(pick[:, 0].astype(int), 0, alpha.shape[1] - 1)
    yi = np.clip(pick[:, 1].astype(int), 0, alpha.shape[0] - 1)
    nrm = -np.stack([gx[yi, xi], gy[yi, xi]], 1).astype(np.float64)
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-6)
    return pick, nrm


def line_kernel(length: float, angle: float, curve: float = 0.0) -> np.ndarray:
    """Normalised blur kernel along a (possibly bent) path of `length` pixels."""
    size = int(math.ceil(length)) // 2 * 2 + 3
    t = np.linspace(-0.5, 0.5, 24)
    x, y = t * length, curve * length * (t * t - 0.25)
    c, s = math.cos(angle), math.sin(angle)
    path = np.stack([c * x - s * y + size / 2, s * x + c * y + size / 2], 1)
    cov = Cover(size, size).lines([path], 1.0 / SS).alpha()
    return cov / max(float(cov.sum()), 1e-6)


def motion_kernel(rng: np.random.Generator, length: float) -> np.ndarray:
    return line_kernel(length, rng.uniform(0, np.pi), curve=rng.choice([0.0, rng.uniform(-0.4, 0.4)]))


def disk_kernel(radius: float) -> np.ndarray:
    size = int(math.ceil(radius)) * 2 + 3
    c = np.array([size / 2, size / 2])
    cov = Cover(size, size).fill([blob(np.random.default_rng(0), c, radius, rough=0.0)]).alpha()
    return cov / max(float(cov.sum()), 1e-6)


def blur_premultiplied(alpha: np.ndarray, premult: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blur an object (motion, defocus): alpha and premultiplied colour with the same kernel, so the
    compositing equation holds for the result. The frame border repeats (the object goes on outside)."""
    a = cv2.filter2D(alpha, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    p = cv2.filter2D(premult, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    a = np.clip(a, 0, 1)
    return a.astype(np.float32), np.clip(p, 0, a[..., None]).astype(np.float32)


# ----------------------------------------------------------------------------------------------- textures

def texture(ctx: Ctx, base: np.ndarray, style: str, angle: float = 0.0) -> np.ndarray:
    """Surface colour (h, w, 3) around `base`: smooth, fur (fibrous streaks), fabric, speckle or print."""
    r, h, w = ctx.rng, ctx.h, ctx.w
    lum = 1.0 + 0.15 * fbm(r, h, w, ctx.m / r.uniform(2, 6), octaves=3)
    col = base[None, None, :] * lum[..., None]
    if style == "fur":  # fibres: noise smeared along the flow, with dark gaps
        n = r.standard_normal((h, w)).astype(np.float32)
        k = line_kernel(r.uniform(4, 14), angle + r.normal(0, 0.2), curve=r.uniform(-0.3, 0.3))
        n = cv2.filter2D(n, -1, k)
        n /= max(float(n.std()), 1e-6)
        contrast = r.uniform(0.15, 0.45)
        col = col * np.clip(1.0 + contrast * n, 0.2, 2.0)[..., None]
        if r.random() < 0.3:  # bright fibre tips of another shade
            tip = np.clip(n - 1.5, 0, None)[..., None]
            col = col + tip * (ctx.colour() - col) * 0.5
        if r.random() < 0.3:  # backing light caught deep in the pile: key-tinted specks, still opaque
            gap = np.clip(-n - 1.0, 0, 1)[..., None] * r.uniform(0.3, 0.8)
            col = col * (1 - gap) + gap * ctx.key * r.uniform(0.3, 0.8)
    elif style == "fabric":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        f = r.uniform(0.5, 1.6)
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * xx + s * yy, -s * xx + c * yy
        weave = np.sin(u * f) * np.sin(v * f)
        col = col * (1.0 + r.uniform(0.05, 0.25) * weave)[..., None]
    elif style == "speckle":  # dots of other colours (prints, pebbles, sequins)
        dots = (r.random((h, w)) < r.uniform(0.01, 0.08)).astype(np.float32)
        dots = cv2.GaussianBlur(dots, (0, 0), r.uniform(0.5, 1.5))
        dots = np.clip(dots / max(float(dots.max()), 1e-6), 0, 1)[..., None]
        col = col * (1 - dots) + dots * ctx.colour()
    elif style == "print":  # stripes or checks of a second colour
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        period = r.uniform(4, 0.2 * ctx.m)
        c, s = math.cos(angle), math.sin(angle)
        band = (np.sin((c * xx + s * yy) * 2 * np.pi / period) > 0)
        if r.random() < 0.5:
            band ^= (np.sin((-s * xx + c * yy) * 2 * np.pi / period) > 0)
        band = cv2.GaussianBlur(band.astype(np.float32), (0, 0), 0.7)[..., None]
        col = col * (1 - band) + band * ctx.colour() * lum[..., None]
    return np.clip(col, 0, 1).astype(np.float32)


def shade(alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rounded-object shading (h, w, 1): darker toward the outline, a soft highlight."""
    mask = (alpha > 0.5).astype(np.uint8)
    d = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    dm = max(float(d.max()), 1.0)
    dome = np.sqrt(np.clip(d / dm, 0, 1))
    s = 1.0 - rng.uniform(0.1, 0.5) * (1.0 - dome)
    return s[..., None].astype(np.float32)


def pick_style(rng: np.random.Generator) -> str:
    return str(rng.choice(["smooth", "fur", "fabric", "speckle", "print"], p=[0.25, 0.3, 0.15, 0.15, 0.15]))
