"""Training data for the GreenPost refiner: procedural green-screen photos with exact alpha and foreground.

Every sample is a pure function of (seed, size): four independent random streams (kind, object,
backing, camera) come from `numpy.random.SeedSequence([seed, STREAM_TAG])`; no global RNG is touched.
So the clean variant (camera_effects=False) and a forced kind leave the other streams unchanged.

How a sample is made (all arrays float32, colour HxWx3 and alpha HxW in 0..1):
1. Backing plate B: a key colour (mostly green, some blue), lit unevenly (one or two soft light
   pools, a linear gradient), cloth wrinkles at several scales (ridged noise plus a few sharp creases),
   slow colour drift across the cloth and soft cast shadows from things out of frame.
2. Object: one of KINDS, drawn 4x supersampled with anti-aliasing and reduced by area averaging, so
   alpha is the object's true coverage of each pixel: sub-pixel hair strands are partly transparent,
   solid interiors are exactly 1 and clean backing is exactly 0. Objects are built from layers
   composited with the premultiplied "over" operator (strand groups, highlights, outlines).
3. The object casts a contact shadow onto B; the backing's light spills onto the object near its
   edges (the spill is part of the returned `fg`: it is physically on the object).
4. Motion blur and defocus blur the object's premultiplied colour and its alpha with the same kernel,
   so the compositing equation still holds for the blurred object.
5. Lens vignetting and the camera's white balance scale F and B alike (they multiply the light).
6. image = alpha * fg + (1 - alpha) * backing, exactly, on the returned arrays (or, with light="linear",
   the same mix in linear light, sRGB-encoded).
7. Camera (skipped with camera_effects=False): lateral chromatic aberration, slight lens blur,
   channel-correlated signal-dependent sensor noise, Bayer demosaicing, sharpening halos, 8-bit
   quantisation and JPEG with 4:2:0 chroma subsampling. Each is drawn with its own probability.

`fg` where alpha == 0 is undefined by the photo; it is filled with a smooth extension of the nearby
object colour so that a foreground loss weighted by alpha sees no jump.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from .refiner_kinds import KIND_BUILDERS
from .refiner_objects import Ctx, bezier, blur_premultiplied, fbm, hsv_rgb, motion_kernel

STREAM_TAG = 0x6B657964   # part of every sample's seed sequence: changing it changes every sample
DATA_VERSION = "1"        # bump when any sample changes; record it with whatever is trained on the data
KINDS = ("hair", "fur", "wire", "mesh", "foliage", "glass", "smoke", "motion", "text", "solid", "greenish")
# how often each kind is drawn (hair/fur/motion/greenish are where keyers fail most)
KIND_WEIGHTS = np.array([3, 2, 1, 1, 1.5, 1, 1, 1.5, 1, 1.5, 1.5], np.float64)
EXTRAS = ("wire", "solid", "text", "smoke")  # what may share the shot with the main object
EXTRA_P = 0.25
MOTION_BASES = ("solid", "hair", "fur", "wire", "text", "foliage", "greenish")  # what moves in "motion"
LIGHTS = ("display", "linear")  # where object and backing are mixed (see make_sample)
MIN_COVER = 0.005  # an object covering less of the frame than this is drawn again
MIN_SIZE, MAX_SIZE = 32, 2048


# ----------------------------------------------------------------------------------------------- backing

def _key_colour(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A key colour and its hue: green 80 % of the time, else blue; saturation and brightness vary."""
    hue = rng.uniform(95, 150) if rng.random() < 0.8 else rng.uniform(200, 235)
    sat = rng.uniform(0.6, 0.95) if rng.random() < 0.8 else rng.uniform(0.4, 0.6)  # some screens are dull
    return hsv_rgb(hue, sat, rng.uniform(0.45, 0.95)), hue


def _wrinkles(rng: np.random.Generator, h: int, w: int, m: float) -> np.ndarray:
    """Cloth relief (h, w) as a luminance change around 0: ridged noise at several scales (cells of
    m/2 down to m/40 pixels), stretched along a random fold direction."""
    lum = np.zeros((h, w), np.float32)
    for scale, amp in ((m / rng.uniform(1.5, 3), rng.uniform(0, 0.08)), (m / rng.uniform(5, 10), rng.uniform(0, 0.05)),
                       (m / rng.uniform(15, 40), rng.uniform(0, 0.025))):
        n = fbm(rng, h, w, max(2.0, scale * h / m), octaves=2)
        lum += amp * (0.6 - np.abs(n))  # ridges where the noise crosses zero: folds
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(0, 180), 1.0)
    rot[:, 0] /= rng.uniform(1.0, 3.0)  # anisotropic: folds run mostly one way
    return cv2.warpAffine(lum, rot, (w, h), borderMode=cv2.BORDER_REFLECT)


def _creases(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sharp cloth creases (h, w) as a luminance change: thin dark lines with a bright side."""
    crease = np.zeros((h * 2, w * 2), np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        p = rng.uniform(-0.2, 1.2, (4, 2)) * np.array([w, h]) * 2
        cv2.polylines(crease, [np.round(bezier(p, 24) * 8).astype(np.int32)[:, None]], False, 255, 2,
                      cv2.LINE_AA, 3)
    cr = cv2.resize(crease, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    cr = cv2.GaussianBlur(cr, (0, 0), rng.uniform(0.5, 1.5))
    side = np.roll(cr, 1, axis=int(rng.integers(0, 2)))
    return rng.uniform(0.02, 0.08) * (side - 1.6 * cr)


def make_backing(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A backing plate (h, w, 3) in 0..1, its nominal key colour and key hue (degrees).
    The smooth light (pools, gradient, relief, out-of-frame shadows, colour drift) is computed at half
    size and upsampled; sharp creases at full size."""
    key, hue = _key_colour(rng)
    m = float(max(h, w))
    hs, ws = (h + 1) // 2, (w + 1) // 2
    yy, xx = np.ogrid[0:hs, 0:ws]
    yy, xx = (yy + 0.5) * (h / hs), (xx + 0.5) * (w / ws)  # full-size coordinates of the half-size cells
    light = np.full((hs, ws), rng.uniform(0.55, 0.85), np.float32)
    for _ in range(int(rng.integers(1, 3))):  # soft pools of light from lamps off frame
        ly, lx = rng.uniform(-0.5, 1.5) * h, rng.uniform(-0.5, 1.5) * w
        r = rng.uniform(0.4, 1.5) * m
        light += rng.uniform(0.15, 0.5) / (1.0 + ((yy - ly) ** 2 + (xx - lx) ** 2) / (r * r))
    g = rng.normal(0, 0.15, 2)  # linear gradient (light from one side)
    light *= 1.0 + g[0] * (yy / m - 0.5) + g[1] * (xx / m - 0.5)
    light = light / max(float(light.max()), 1e-3) * rng.uniform(0.85, 1.1)
    light *= 1.0 + _wrinkles(rng, hs, ws, m)
    if rng.random() < 0.35:  # soft shadow of something out of frame
        sh = np.zeros((hs, ws), np.uint8)
        pts = (rng.uniform(-0.3, 1.3, (int(rng.integers(3, 7)), 2)) * np.array([ws, hs])).astype(np.int32)
        cv2.fillPoly(sh, [cv2.convexHull(pts)], 255)
        shf = cv2.GaussianBlur(sh.astype(np.float32) / 255, (0, 0), rng.uniform(0.015, 0.075) * m)
        light *= 1.0 - rng.uniform(0.1, 0.45) * shf
    drift = 1.0 + rng.uniform(0.0, 0.06) * fbm(rng, hs, ws, m / rng.uniform(2, 6), octaves=2, channels=3)
    plate = key[None, None, :] * light[..., None] * drift
    plate = cv2.resize(plate.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, 3)
    if rng.random() < 0.5:
        plate *= 1.0 + _creases(rng, h, w)[..., None]
    return np.clip(plate, 0.0, 1.0).astype(np.float32), key, float(hue)


def contact_shadow(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """Darkening factor (h, w) of the backing from the object's shadow: its alpha shifted toward the
    backing (light in front and above), blurred."""
    h, w = alpha.shape
    if rng.random() < 0.2 or not alpha.any():
        return np.ones((h, w), np.float32)
    m = max(h, w)
    dx, dy = rng.normal(0, 0.04) * m, rng.uniform(0.0, 0.08) * m
    mat = np.float32([[1, 0, dx], [0, 1, dy]])
    sh = cv2.warpAffine(alpha, mat, (w, h), borderMode=cv2.BORDER_CONSTANT)
    sh = cv2.GaussianBlur(sh, (0, 0), rng.uniform(0.01, 0.08) * m)
    return (1.0 - rng.uniform(0.1, 0.5) * np.clip(sh, 0, 1)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- object

def apply_spill(rng: np.random.Generator, alpha: np.ndarray, premult: np.ndarray, backing: np.ndarray) -> np.ndarray:
    """Backing light on the object near its edges (and on thin strands, which are all edge), sometimes a
    little over all of it: the straight colour moves toward the backing's. Works on premultiplied colour."""
    if rng.random() < 0.15:
        return premult
    h, w = alpha.shape
    s = rng.uniform(0.05, 0.45)
    inner = cv2.GaussianBlur(alpha, (0, 0), rng.uniform(1.0, 0.03 * max(h, w) + 1.0))
    edge = np.clip(1.0 - inner, 0.0, 1.0) ** rng.uniform(0.7, 2.0)
    bounce = rng.uniform(0.0, 0.08) if rng.random() < 0.4 else 0.0  # the screen lights the whole object a little
    t = np.minimum(s * edge + bounce, 0.6)[..., None]
    wrap = cv2.GaussianBlur(backing, (0, 0), 3.0) * rng.uniform(0.8, 1.1)
    return (premult * (1 - t) + t * alpha[..., None] * np.clip(wrap, 0, 1)).astype(np.float32)


def fill_foreground(alpha: np.ndarray, premult: np.ndarray) -> np.ndarray:
    """Straight colour premult / alpha where alpha > 0; elsewhere a smooth extension of the nearby object
    colour (pull-push: alpha-weighted averages on a pyramid, coarser levels fill where finer ones are thin)."""
    a = alpha[..., None]
    fg = np.clip(premult / np.maximum(a, 1e-12), 0.0, 1.0).astype(np.float32)
    hole = alpha <= 0
    if not hole.any():
        return fg
    if not (alpha > 0).any():
        fg[:] = 0.5
        return fg
    levels = [(premult.astype(np.float32), alpha.astype(np.float32))]
    while max(levels[-1][1].shape) > 1:
        n, d = levels[-1]
        size = (max(1, (n.shape[1] + 1) // 2), max(1, (n.shape[0] + 1) // 2))
        levels.append((cv2.resize(n, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], 3),
                       cv2.resize(d, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0])))
    n, d = levels[-1]
    est = n / max(float(d.max()), 1e-12)
    for n, d in reversed(levels[:-1]):
        up = cv2.resize(est, (n.shape[1], n.shape[0]), interpolation=cv2.INTER_LINEAR).reshape(n.shape)
        est = n + (1.0 - d[..., None]) * up
    fg[hole] = np.clip(est[hole], 0.0, 1.0)
    return fg


# ----------------------------------------------------------------------------------------------- camera

DEMOSAIC = (cv2.COLOR_BayerBG2RGB, cv2.COLOR_BayerBG2RGB_EA, cv2.COLOR_BayerBG2RGB_VNG)  # for an RGGB mosaic


def _chromatic_aberration(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Lateral chromatic aberration: red and blue magnified slightly differently about the lens centre
    (up to ~1.5 px at the frame's corner), which puts colour fringes on edges."""
    h, w = img.shape[:2]
    c = (w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7))
    shift = rng.uniform(0.3, 1.5) / (0.7 * max(h, w))
    out = img.copy()
    for ch, sgn in ((0, 1.0), (2, -1.0)):
        mat = cv2.getRotationMatrix2D(c, 0.0, 1.0 + sgn * shift)
        out[..., ch] = cv2.warpAffine(img[..., ch], mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return out


def _demosaic(img: np.ndarray, code: int) -> np.ndarray:
    """Keep one colour per pixel (RGGB Bayer mosaic, 8-bit) and interpolate the rest back, as a camera
    does: zipper and false-colour artefacts along fine edges."""
    u8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    bayer = np.empty(u8.shape[:2], np.uint8)
    bayer[0::2, 0::2] = u8[0::2, 0::2, 0]
    bayer[0::2, 1::2] = u8[0::2, 1::2, 1]
    bayer[1::2, 0::2] = u8[1::2, 0::2, 1]
    bayer[1::2, 1::2] = u8[1::2, 1::2, 2]
    return cv2.cvtColor(bayer, code).astype(np.float32) / 255.0


def sensor_noise(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Signal-dependent noise (read noise plus shot noise growing with the light), correlated across the
    channels as demosaicing makes it, sometimes spatially coarser too. Returns the noisy image."""
    read, shot = rng.uniform(0.002, 0.015), rng.uniform(0.0, 0.02)
    sigma = np.sqrt(read * read + shot * shot * img)
    shared = rng.standard_normal(img.shape[:2], dtype=np.float32)[..., None]
    own = rng.standard_normal(img.shape, dtype=np.float32)
    rho = rng.uniform(0.3, 0.85)
    n = rho * shared + math.sqrt(1 - rho * rho) * own
    if rng.random() < 0.5:
        n = cv2.GaussianBlur(n, (0, 0), rng.uniform(0.4, 0.8))
        n /= max(float(n.std()), 1e-6)
    return img + sigma * n


def jpeg_420(img: np.ndarray, quality: int) -> np.ndarray:
    """Round trip through an 8-bit JPEG with 4:2:0 chroma subsampling (what most cameras write)."""
    u8 = (np.clip(img[..., ::-1], 0, 1) * 255 + 0.5).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed at quality {quality}")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0


def camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """What a camera adds to the light: lens blur and chromatic aberration, channel-correlated
    signal-dependent sensor noise, demosaicing, sharpening, 8-bit quantisation, JPEG with 4:2:0 chroma."""
    img = image
    if rng.random() < 0.3:
        img = _chromatic_aberration(rng, img)
    if rng.random() < 0.6:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.8))
    if rng.random() < 0.9:
        img = sensor_noise(rng, img)
    if rng.random() < 0.25:
        img = _demosaic(img, int(rng.choice(DEMOSAIC)))
    if rng.random() < 0.4:  # in-camera sharpening: halos along edges
        img = img + rng.uniform(0.2, 0.8) * (img - cv2.GaussianBlur(img, (0, 0), rng.uniform(0.8, 2.0)))
    img = np.clip(img, 0.0, 1.0)
    if rng.random() < 0.75:
        img = jpeg_420(img, int(rng.integers(60, 99)))
    elif rng.random() < 0.9:
        img = np.round(img * 255) / 255
    return np.ascontiguousarray(img, dtype=np.float32)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in 0..1 to linear light (IEC 61966-2-1)."""
    x = np.asarray(x, np.float32)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear light in 0..1 to sRGB-encoded values (IEC 61966-2-1)."""
    x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * x ** (1 / 2.4) - 0.055).astype(np.float32)


# ----------------------------------------------------------------------------------------------- API

def _check(seed, size) -> tuple[int, int]:
    """Validate the arguments; returns (height, width)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer")
    dims = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(dims) != 2 or not all(not isinstance(d, bool) and isinstance(d, (int, np.integer)) and MIN_SIZE <= d <= MAX_SIZE
                                 for d in dims):
        raise ValueError(f"size={size!r}: expected an integer or a (height, width) pair of integers, each in "
                         f"[{MIN_SIZE}, {MAX_SIZE}] pixels")
    return int(dims[0]), int(dims[1])


def make_sample(seed: int, size: int | tuple[int, int] = 256, *, camera_effects: bool = True,
                kind: str | None = None, light: str = "display") -> dict:
    """One training sample (see the module docstring). size: side in pixels, or (height, width).
    Returns float32 arrays `image` (H, W, 3), `alpha` (H, W), `fg` (H, W, 3), `backing` (H, W, 3), and
    `kind` (str).

    camera_effects=False returns the clean photo, for which image == alpha*fg + (1-alpha)*backing up to
    float rounding; with True (the default) the camera's effects follow, everything else is identical.
    kind forces one of KINDS (default: drawn from the seed with KIND_WEIGHTS).
    light="linear" mixes object and backing in linear light, as a lens and sensor do, and sRGB-encodes
    the photo: then srgb_to_linear(image) == alpha*srgb_to_linear(fg) + (1-alpha)*srgb_to_linear(backing)
    before the camera effects; alpha, fg and backing are the same arrays as with "display" (the default,
    the compositing of matting benchmarks: image == alpha*fg + (1-alpha)*backing on the encoded values)."""
    h, w = _check(seed, size)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected None or one of {', '.join(KINDS)}")
    if light not in LIGHTS:
        raise ValueError(f"light={light!r}: expected one of {', '.join(LIGHTS)}")
    r_kind, r_obj, r_back, r_cam = (np.random.default_rng(s)
                                    for s in np.random.SeedSequence([int(seed), STREAM_TAG]).spawn(4))
    picked = str(r_kind.choice(KINDS, p=KIND_WEIGHTS / KIND_WEIGHTS.sum()))
    kind = kind or picked
    backing, key, hue = make_backing(r_back, h, w)
    ctx = Ctx(rng=r_obj, h=h, w=w, key=key, key_hue=hue)
    base = str(r_obj.choice(MOTION_BASES)) if kind == "motion" else kind
    for _ in range(8):  # an object that missed the frame is drawn again (from the same stream)
        alpha, premult = KIND_BUILDERS[base](ctx)
        if float(alpha.sum()) >= MIN_COVER * h * w:
            break
    if kind != "motion" and r_obj.random() < EXTRA_P:  # a second, simpler thing in the shot
        a2, p2 = KIND_BUILDERS[str(r_obj.choice(EXTRAS))](ctx)
        if r_obj.random() < 0.5:  # in front or behind
            alpha, premult, a2, p2 = a2, p2, alpha, premult
        premult = premult + p2 * (1 - alpha[..., None])
        alpha = alpha + a2 * (1 - alpha)
    backing = backing * contact_shadow(r_back, alpha)[..., None]
    premult = apply_spill(r_obj, alpha, premult, backing)
    if kind == "motion":
        k = motion_kernel(r_obj, length=r_obj.uniform(3, 0.12 * max(h, w) + 4))
        alpha, premult = blur_premultiplied(alpha, premult, k)
    # vignetting and white balance multiply the light from object and backing alike
    yy, xx = np.ogrid[0:h, 0:w]
    r2 = ((yy - r_back.uniform(0.3, 0.7) * h) ** 2 + (xx - r_back.uniform(0.3, 0.7) * w) ** 2) / (0.5 * max(h, w)) ** 2
    vig = (1.0 - r_back.uniform(0.0, 0.3) * np.clip(r2 / 2.0, 0, 1.5))[..., None]
    wb = np.exp(r_back.normal(0, 0.05, 3)).astype(np.float32)
    wb /= max(float(wb.max()), 1.0)
    scale = (vig * wb).astype(np.float32)
    backing = np.clip(backing * scale, 0, 1).astype(np.float32)
    premult = premult * scale
    alpha = np.where(alpha < 1e-6, 0.0, np.where(alpha > 1 - 1e-6, 1.0, alpha)).astype(np.float32)
    fg = fill_foreground(alpha, premult)
    a = alpha[..., None]
    if light == "linear":
        image = linear_to_srgb(a * srgb_to_linear(fg) + (1 - a) * srgb_to_linear(backing))
    else:
        image = (a * fg + (1 - a) * backing).astype(np.float32)
    if camera_effects:
        image = camera(r_cam, image)
    return {"image": image, "alpha": alpha, "fg": fg, "backing": backing, "kind": kind}


def make_batch(seeds: Sequence[int], size: int | tuple[int, int] = 256, *, camera_effects: bool = True,
               light: str = "display", to_tensor: Callable | None = None) -> dict:
    """Samples for `seeds`, stacked: image/fg/backing (N, H, W, 3), alpha (N, H, W), kind list[str].
    to_tensor (e.g. torch.from_numpy) is applied to each stacked array when given."""
    if len(seeds) == 0:
        raise ValueError("seeds is empty: expected at least one seed")
    samples = [make_sample(int(s), size, camera_effects=camera_effects, light=light) for s in seeds]
    out = {}
    for name in ("image", "alpha", "fg", "backing"):
        arr = np.stack([s[name] for s in samples])
        out[name] = to_tensor(arr) if to_tensor is not None else arr
    out["kind"] = [s["kind"] for s in samples]
    return out


def contact_sheet(seeds: Sequence[int], size: int = 128, columns: int = 4) -> np.ndarray:
    """An 8-bit RGB sheet to look at samples: per seed, the photo, alpha, the foreground over grey and
    the backing plate side by side, labelled with the kind."""
    rows = []
    for s in seeds:
        d = make_sample(int(s), size)
        grey = d["alpha"][..., None] * d["fg"] + (1 - d["alpha"][..., None]) * 0.5
        tiles = [d["image"], np.repeat(d["alpha"][..., None], 3, 2), grey, d["backing"]]
        row = np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=1.0) for t in tiles], 1)
        row = (np.clip(row, 0, 1) * 255 + 0.5).astype(np.uint8)
        cv2.putText(row, f"{s} {d['kind']}", (4, 12), cv2.FONT_HERSHEY_PLAIN, 0.8, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(row)
    while len(rows) % columns:
        rows.append(np.zeros_like(rows[0]))
    grid = [np.concatenate(rows[i::columns], 0) for i in range(columns)]
    return np.concatenate(grid, 1)
