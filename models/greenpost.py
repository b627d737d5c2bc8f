"""GreenPost: green-screen keying and refinement (straight foreground with spill removed, plus alpha).

How it works (all vectorised torch; heavy spatial work runs on a grid `f` times coarser than the image,
f a power of two chosen so the grid is at most ~320 pixels on its long side):

1. Key colour: picked, or estimated as the median of the clearly key-dominant pixels.
2. Backing plate B(x): pixels whose colour is the key's up to brightness (a brightness-invariant
   colour-difference ratio) are sure backing; B is filled under the object by pull-push interpolation
   (a normalised-convolution pyramid), so light falloff, hot spots and contact shadows are followed.
   The noise of the photo (sensor noise, JPEG) is measured on the backing from the residual I - B.
3. Foreground prior F0(x) and its local colour covariance S_F(x): the same pull-push from sure
   foreground blocks (no key-colour excess, away from the backing; for objects of the key's own hue,
   the solid interior of regions that differ clearly from the plate) spreads the nearby object colours
   and their spread (block means and within-block second moments) outward over the edge.
4. Alpha by discriminant unmixing: with d = F0 - B, the compositing equation I - B = a(F - B) + noise is
   projected on w = (S_F + S_noise)^-1 d, the direction that best separates the object's local colours
   from the backing while ignoring the object's texture and the noise: a = w.(I - B) / w.d. It is kept
   within the physically possible range (F in [0,1]^3 gives a lower bound; an object without key
   excess gives the colour-difference upper bound), and values within the measured noise of 0 or 1 are
   snapped (the `edge_detail` option sets how many noise deviations).
5. Foreground: maximum a posteriori unmixing F = (a(I - (1-a)B) + m F0) / (a^2 + m), then spill
   removal: the key channel's excess over the larger other channel is removed (`spill_strength` of it),
   except, for objects of the key's own hue, the excess their surrounding clean colour has.

With a prior alpha (from a network), pixels the prior calls solid inside and clearly outside are used as
seeds, the prior works as a garbage/holdout matte, and it replaces the key where the colours cannot
separate object and backing (objects of the backing's own colour).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F


class KeyMode(str, Enum):
    AUTO = "auto"
    PICKED = "picked"


class RefinerChoice(str, Enum):
    """Which learned refinement runs on the classical alpha's uncertain band (models/refiner.py)."""

    SHIPPED = "greenpost_refiner"  # the weights shipped in models/weights/
    OFF = "off"                    # classical keying only


# One line per option; the node reuses them as tooltips.
OPTION_DOCS = {
    "key_color": "Backing colour to key out, (r, g, b) in 0..1, or None to estimate it from the image (the most "
                 "common strongly green colour). Pick it from a well-lit part of the backing.",
    "spill_strength": "How much green spill to remove from the object's colour (0 = keep the colour as unmixed, "
                      "1 = remove all key-colour cast beyond the object's own nearby colour).",
    "edge_detail": "Balance between faint detail and a clean matte: 0 snaps everything within 3 noise deviations "
                   "of the backing or the object to fully transparent/opaque (clean, crisp), 1 keeps every faint "
                   "wisp the colours support (fine hair, smoke; noisier). 0.5 suits most photos.",
    "clip_black": "Matte levels: alpha at or below this becomes 0 (fully transparent), the rest is rescaled.",
    "clip_white": "Matte levels: alpha at or above this becomes 1 (fully opaque), the rest is rescaled.",
    "refiner": "Learned refinement of the uncertain edge band (hair, fur, noise speckles): 'greenpost_refiner' "
               "(default) runs the small network shipped with the pack on the pixels the classical key is unsure "
               "of (alpha strictly between 0 and 1; solid interiors and clean backing stay exactly 1 and 0); "
               "'off' keeps the classical key (faster).",
}


@dataclass(frozen=True)
class GreenPostOptions:
    """Keying options; see OPTION_DOCS for what each does."""

    key_color: tuple[float, float, float] | None = None
    spill_strength: float = 1.0
    edge_detail: float = 0.5
    clip_black: float = 0.0
    clip_white: float = 1.0
    refiner: str = RefinerChoice.SHIPPED.value

    def __post_init__(self):
        choices = [c.value for c in RefinerChoice]
        if str(getattr(self.refiner, "value", self.refiner)) not in choices:
            raise ValueError(f"refiner={self.refiner!r}: expected one of {choices}; 'off' keys classically")
        object.__setattr__(self, "refiner", str(getattr(self.refiner, "value", self.refiner)))
        if self.key_color is not None:
            kc = tuple(self.key_color)
            if len(kc) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0
                                       for v in kc):
                raise ValueError(f"key_color={self.key_color!r}: expected None (auto) or three numbers (r, g, b) in "
                                 f"0..1; divide 8-bit values by 255")
            if max(kc) - min(kc) < 0.05:
                raise ValueError(f"key_color={self.key_color!r} is grey: a keyable backing has one dominant channel "
                                 f"(e.g. green (0.1, 0.8, 0.2)); pick the colour of the backing or use auto")
        for name, lo, hi in (("spill_strength", 0.0, 1.0), ("edge_detail", 0.0, 1.0), ("clip_black", 0.0, 1.0),
                             ("clip_white", 0.0, 1.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"{name}={v!r}: expected a number in [{lo}, {hi}]")
        if self.clip_black >= self.clip_white:
            raise ValueError(f"clip_black={self.clip_black} must be below clip_white={self.clip_white}; lower "
                             f"clip_black or raise clip_white")


# ----------------------------------------------------------------------------------------------- helpers

def _pool(x: torch.Tensor, f: int) -> torch.Tensor:
    """Average over f x f blocks (ragged border blocks average what they have). x: (N, C, H, W)."""
    if f == 1:
        return x
    return F.avg_pool2d(x, f, stride=f, ceil_mode=True)


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    if r <= 0:
        return m
    return F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)


def _erode(m: torch.Tensor, r: int) -> torch.Tensor:
    if r <= 0:
        return m
    return -F.max_pool2d(-m, 2 * r + 1, stride=1, padding=r)


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pull_push(num: torch.Tensor, den: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Fill a sparse field: num (N, C, h, w) = value * weight averages, den (N, 1, h, w) = weight averages in
    [0, 1]. Returns (dense field, whether any weight was present). Coarser levels fill where data is thin."""
    levels = []
    n, d = num, den
    while n.shape[-2] > 1 or n.shape[-1] > 1:
        levels.append((n, d))
        k = (2 if n.shape[-2] > 1 else 1, 2 if n.shape[-1] > 1 else 1)
        n = F.avg_pool2d(n, k, stride=k, ceil_mode=True)
        d = F.avg_pool2d(d, k, stride=k, ceil_mode=True)
    has = bool(d.max() > 0)
    est = n / d.clamp_min(1e-12)
    for n_l, d_l in reversed(levels):
        est = n_l + (1.0 - d_l) * _up(est, tuple(n_l.shape[-2:]))
    return est, has


def _dominant(key: torch.Tensor) -> tuple[int, list[int]]:
    p = int(torch.argmax(key))
    return p, [c for c in range(3) if c != p]


def _excess(x: torch.Tensor, p: int, o: list[int]) -> torch.Tensor:
    """Key-channel excess over the larger other channel (colour difference). x: (N, 3, H, W) -> (N, 1, H, W)."""
    return x[:, p:p + 1] - torch.maximum(x[:, o[0]:o[0] + 1], x[:, o[1]:o[1] + 1])


def estimate_key_color(rgb: torch.Tensor) -> torch.Tensor:
    """Auto key: the backing's colour, green, blue or red. The dominant channel is the one that clearly
    dominates most cells on the image border (where a backing almost always shows; over the whole image
    when no border cell has a dominant channel); the key is the median colour of the cells it clearly
    dominates. rgb: (3, H, W) -> (3,)."""
    hwc = rgb.permute(1, 2, 0)
    H, W = hwc.shape[:2]
    f = _grid_factor(H, W, 256)
    small = torch.cat([_pool(_rows(hwc, y0, y1), f) for y0, y1 in _bands(H, W, f)], 2)[0]
    border = torch.zeros(small.shape[-2:], dtype=torch.bool, device=rgb.device)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    small, border = small.reshape(3, -1), border.reshape(-1)
    best = None
    for c in (1, 2, 0):  # green first: it wins ties
        o = [k for k in range(3) if k != c]
        e = small[c] - torch.maximum(small[o[0]], small[o[1]])
        strong = e.quantile(0.98) if e.numel() > 1 else e.max()
        sel = e > torch.clamp(0.5 * strong, min=0.04)
        score = (int((sel & border).sum()), int(sel.sum()))
        if score[1] > 0 and (best is None or score > best[0]):
            best = (score, sel)
    if best is None:
        return torch.tensor([0.1, 0.7, 0.2], device=rgb.device)
    return small[:, best[1]].median(dim=1).values


def _solve3(S: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Solve S w = d for symmetric 3x3 S per pixel. S: (N, 6, h, w) as xx, yy, zz, xy, xz, yz; d: (N, 3, h, w)."""
    a, b, c, xy, xz, yz = S.unbind(1)
    c00 = b * c - yz * yz
    c01 = xz * yz - xy * c
    c02 = xy * yz - xz * b
    c11 = a * c - xz * xz
    c12 = xy * xz - a * yz
    c22 = a * b - xy * xy
    det = a * c00 + xy * c01 + xz * c02
    d0, d1, d2 = d.unbind(1)
    w0 = c00 * d0 + c01 * d1 + c02 * d2
    w1 = c01 * d0 + c11 * d1 + c12 * d2
    w2 = c02 * d0 + c12 * d1 + c22 * d2
    return torch.stack([w0, w1, w2], 1) / det.clamp_min(1e-30)[:, None]


def _quad(S: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w^T S w per pixel -> (N, 1, h, w)."""
    a, b, c, xy, xz, yz = S.unbind(1)
    w0, w1, w2 = w.unbind(1)
    q = a * w0 * w0 + b * w1 * w1 + c * w2 * w2 + 2 * (xy * w0 * w1 + xz * w0 * w2 + yz * w1 * w2)
    return q[:, None]


GRID = 320  # long side of the coarse grid the smooth fields live on
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


# ----------------------------------------------------------------------------------------------- core

def _grid_factor(H: int, W: int, target: int) -> int:
    """Power-of-two block size so the coarse grid is at most `target` cells on the long side."""
    f = 1
    while max(H, W) / f > target:
        f *= 2
    return f


ALL_SET = 1.0 - 1e-6  # a 0/1 mask's block mean at or above this: every pixel of the block is set (exact for
                     # blocks below a million pixels: one unset pixel leaves at most 1 - 1/n)
BAND_PIXELS = 1 << 20  # full-resolution work runs in row bands of about this many pixels (bounds memory)
REACH = 1 / 100  # solid interior / clean backing: this fraction of the short side from any doubt
CLEAN_SIGMAS = 2.0     # a block whose mean squared distance to the plate exceeds this many times the noise
                       # variance (plus 0.01^2) is not clean backing


NOISE_BLOCK = 4  # the noise is measured against the plate averaged over blocks of at least this many pixels


def _noise_var(xs: torch.Tensor, ms: torch.Tensor, B_low: torch.Tensor, f: int) -> torch.Tensor:
    """Per-channel noise variance on the backing: median squared residual to the plate / chi2(1) median,
    on a strided subsample xs (1, 3, hs, ws) of the image with its sure-backing mask ms (1, 1, hs, ws).
    On a grid finer than NOISE_BLOCK pixels (small images, f < NOISE_BLOCK) the plate follows the backing
    pixels, noise included: it is averaged over NOISE_BLOCK-pixel blocks first, as a coarser grid does."""
    k = NOISE_BLOCK // f
    if k > 1:
        B_low = _up(F.avg_pool2d(B_low, k, stride=k, ceil_mode=True), tuple(B_low.shape[-2:]))
    r2 = ((xs - _up(B_low, tuple(xs.shape[-2:]))) ** 2).reshape(3, -1)[:, ms.reshape(-1) > 0]
    if r2.shape[1] < 16:
        return torch.full((3,), 1e-4, device=xs.device)
    return (r2.median(dim=1).values / 0.4549).clamp(1e-6, 0.05)


def _up_rows(low: torch.Tensor, size: tuple[int, int], y0: int, y1: int) -> torch.Tensor:
    """Rows y0..y1-1 of `_up(low, size)` (bilinear, align_corners=False), computed from the coarse rows they
    need only, so a band of a large image costs a band's memory and equals the whole-image upsampling."""
    H, W = size
    h = low.shape[-2]
    ys = ((torch.arange(y0, y1, device=low.device, dtype=torch.float64) + 0.5) * (h / H) - 0.5).clamp_(min=0)
    i0 = ys.floor().long().clamp_(max=h - 1)
    i1 = (i0 + 1).clamp_(max=h - 1)
    lam = (ys - i0).clamp_(0, 1).float().view(1, 1, -1, 1)
    # vertical interpolation on the coarse columns, then horizontal (vertically the identity) to W
    rows = torch.lerp(low[:, :, i0], low[:, :, i1], lam)
    return F.interpolate(rows, size=(y1 - y0, W), mode="bilinear", align_corners=False)


def _bands(H: int, W: int, align: int):
    """Row ranges covering 0..H, each a multiple of `align` rows (but the last) and about BAND_PIXELS."""
    step = max(align, (BAND_PIXELS // max(W, 1)) // align * align)
    return [(y, min(H, y + step)) for y in range(0, H, step)]


def _rows(rgb: torch.Tensor, y0: int, y1: int) -> torch.Tensor:
    """Rows of an (H, W, 3) image as a contiguous (1, 3, h, W) float32 tensor, clamped to [0, 1]."""
    return rgb[y0:y1].permute(2, 0, 1)[None].float().clamp(0, 1)


@dataclass
class KeyFields:
    """Everything the classical key of one image (or of a band of its rows) computed, for consumers that
    refine it (models/refiner.py).

    Full-resolution fields are (1, C, h, W) float32 for the rows row0..row0+h-1 of an image of
    `image_size`; the alpha-uncertainty scales live on the whole image's coarse grid (block size
    `grid_factor`); upsample them with `scales_at`."""

    key: torch.Tensor        # (3,) key colour used
    backing: torch.Tensor    # (1, 3, h, W) backing plate B, filled under the object
    alpha: torch.Tensor      # (1, 1, h, W) final alpha in [0, 1] (after refinement and matte levels)
    prior_fg: torch.Tensor   # (1, 3, h, W) local object colour F0 (foreground prior)
    fg: torch.Tensor | None  # (1, 3, h, W) straight foreground, spill removed (None while refining)
    noise_std: torch.Tensor  # (3,) per-channel noise deviation measured on the backing
    sig0_low: torch.Tensor   # (1, 1, gh, gw) alpha noise deviation near alpha 0 (photo noise only)
    sig1_low: torch.Tensor   # (1, 1, gh, gw) near alpha 1 (plus object texture) = 1 / colour separation
    grid_factor: int
    classical_alpha: torch.Tensor | None = None  # (1, 1, h, W) before refinement and matte levels
    row0: int = 0                                # first image row these fields cover
    image_size: tuple[int, int] | None = None    # (H, W) of the whole image (None: the fields' own size)

    def scales_at(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sig0, sig1) upsampled to `size` (the whole image's), each (1, 1, H, W)."""
        up = _up(torch.cat([self.sig0_low, self.sig1_low], 1), size)
        return up[:, 0:1], up[:, 1:2]


@dataclass
class _Plan:
    """The coarse fields of one image, computed once (two streaming passes over row bands)."""

    size: tuple[int, int]
    f: int
    key: torch.Tensor
    p: int
    o: list[int]
    e_key: float
    B_low: torch.Tensor     # (1, 3, gh, gw)
    var_n: torch.Tensor     # (3,)
    low: torch.Tensor       # (1, 12 or 13, gh, gw): wn, wB, F0, lo, inv_range, c1, inv_e, hold (+1 opaque
                            # interior, -1 clean backing), and with a prior sig1
    sig0: torch.Tensor
    sig1: torch.Tensor


def _screen(x: torch.Tensor, p: int, o: list[int], e_key: float, kp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(key-colour excess, brightness-invariant screen-ness: 1 on the key at any brightness, <= 0 without
    key excess)."""
    e_img = _excess(x, p, o)
    return e_img, e_img / x[:, p:p + 1].mul(e_key / kp).clamp_min(0.15 * e_key)


def _plan(rgb: torch.Tensor, prior: torch.Tensor | None, opt: GreenPostOptions) -> _Plan:
    """rgb: (H, W, 3); prior: (H, W) or None."""
    H, W = rgb.shape[:2]
    dev = rgb.device
    f = _grid_factor(H, W, GRID)
    bands = _bands(H, W, f)
    key = (torch.tensor(opt.key_color, dtype=torch.float32, device=dev) if opt.key_color is not None
           else estimate_key_color(rgb.permute(2, 0, 1)))
    p, o = _dominant(key)
    e_key = float(_excess(key.view(1, 3, 1, 1), p, o).clamp_min(1e-3))
    kp = float(key[p].clamp_min(1e-3))
    s = max(1, int(math.sqrt(H * W / 65536)))  # stride of the noise subsample

    # pass 1: block means and second moments, and which blocks are sure backing / object / seeds
    acc = {k: [] for k in ("xl", "xx", "bg", "notbg", "seeds", "near", "held", "xs", "ms")}
    n_masks = 5 if prior is not None else 4  # without a prior nothing is held
    for y0, y1 in bands:
        # one buffer, one pooling call: the colour, its squares and 0/1 masks; a mask's block mean is 1 where the
        # whole block is set (its block minimum) and above 0 where any pixel is (its block maximum)
        buf = torch.empty(1, 6 + n_masks, y1 - y0, W, device=dev)
        x = buf[:, 0:3]
        x.copy_(rgb[y0:y1].permute(2, 0, 1)[None]).clamp_(0, 1)
        torch.mul(x, x, out=buf[:, 3:6])
        _, screen = _screen(x, p, o, e_key, kp)
        sure_bg, not_bg, seeds, near = (buf[:, k:k + 1] for k in range(6, 10))
        sure_bg.copy_(screen > 0.8)
        not_bg.copy_(screen < 0.25)
        seeds.copy_(screen < 0.1)
        near.copy_(screen > 0.35)
        if prior is not None:
            pr = prior[y0:y1][None, None]
            sure_bg.mul_((pr < 0.1).float())
            seeds.copy_(torch.maximum(seeds * (pr > 0.5).float(), (pr > 0.95).float()))
            not_bg.copy_(torch.maximum(not_bg, (pr > 0.5).float()))
            near.mul_((pr < 0.5).float())
            buf[:, 10:11].copy_(pr > 0.02)
        pooled = _pool(buf, f)
        acc["xl"].append(pooled[:, 0:3])
        acc["xx"].append(pooled[:, 3:6])
        every = (pooled[:, 6:9] >= ALL_SET).float()
        acc["bg"].append(every[:, 0:1])
        acc["notbg"].append(every[:, 1:2])
        acc["seeds"].append(every[:, 2:3])
        anyset = (pooled[:, 9:6 + n_masks] > 0).float()
        acc["near"].append(anyset[:, 0:1])
        acc["held"].append(anyset[:, 1:2] if prior is not None else torch.zeros_like(anyset[:, 0:1]))
        r = torch.arange(y0, y1, device=dev)
        keep = (r % s == 0).nonzero().view(-1)
        acc["xs"].append(x[:, :, keep, ::s])
        acc["ms"].append(sure_bg[:, :, keep, ::s])
    xl, xx, m_bg, not_bg_low, seeds_pool, near_low, held_low, xs, ms = (torch.cat(acc[k], 2) for k in acc)
    del acc

    # the backing plate from the sure-backing blocks, filled under the object; the photo's noise on it
    B_low, has = pull_push(xl * m_bg, m_bg)
    if not has:
        B_low = key.view(1, 3, 1, 1).expand_as(xl).clone()
    var_n = _noise_var(xs, ms, B_low, f)

    # blocks that differ clearly from the plate (objects of the key's own hue), and blocks off the plate by
    # more than the noise (not clean backing), from the blocks' mean squared distance to the plate,
    # sum_c <x_c^2> - 2 B_c <x_c> + B_c^2 (the plate is smooth: constant over a block)
    msd = (xx - 2.0 * B_low * xl + B_low * B_low).sum(1, keepdim=True)
    noise = float(var_n.sum())
    differs = (msd > 16.0 * noise + 0.15 ** 2).float()
    off_plate = torch.maximum((msd > CLEAN_SIGMAS * noise + 0.01 ** 2).float(), held_low)

    # foreground seeds: no key excess, away from the backing; plus the solid interior of regions that
    # differ clearly from the plate but have no clean seed nearby
    seeds_low = seeds_pool * _erode(not_bg_low, 2)
    solid = _erode(differs, 2)
    seeds_low = torch.maximum(seeds_low, solid * (1.0 - _dilate(seeds_low, 8)))

    # local object colour (mean F0, covariance) by pull-push of the seed blocks' moments
    if bool(seeds_low.max() > 0):
        prods = torch.cat([xl] + [xl[:, i:i + 1] * xl[:, j:j + 1] for i, j in _PAIRS], 1)
        if f > 1:  # the texture's spread within each block too
            prods[:, 3:6] = xx
        est, _ = pull_push(prods * seeds_low, seeds_low)
        F0_low = est[:, :3]
        cov = torch.cat([est[:, 3 + k:4 + k] - F0_low[:, i:i + 1] * F0_low[:, j:j + 1]
                         for k, (i, j) in enumerate(_PAIRS)], 1)
    else:  # nothing looks like an object: project on the key's complement
        F0_low = (1 - key.view(1, 3, 1, 1)).expand_as(B_low).clone()
        cov = torch.zeros(1, 6, *B_low.shape[-2:], device=dev)

    # discriminant direction and alpha-noise scales on the grid
    d = F0_low - B_low
    S = cov.clone()
    S[:, :3] += var_n.view(1, 3, 1, 1) + 1e-4
    wv = _solve3(S, d)
    wd = (wv * d).sum(1, keepdim=True).clamp_min(1e-8)
    wn = wv / wd
    sig0 = _quad(S - cov, wn).clamp_min(0).sqrt()  # alpha noise near 0 (photo noise only)
    sig1 = _quad(S, wn).clamp_min(0).sqrt()        # near 1 (plus object texture) = 1 / separation
    k = 3.0 * (1.0 - opt.edge_detail)
    lo = k * sig0
    inv_range = 1.0 / (1.0 - k * sig1.clamp(max=0.3) - lo).clamp_min(0.05)
    # colour-difference upper bound for objects without key excess: a <= (eB - e(I) + m) / (eB - eF)
    marg = 2.0 * var_n.sqrt()
    eB = _excess(B_low, p, o)
    eF = _excess(F0_low, p, o).clamp_min(0) + 0.05
    valid = (eB - eF) > 0.05
    inv_e = torch.where(valid, 1.0 / (eB - eF).clamp_min(0.05), torch.zeros_like(eB))
    c1 = torch.where(valid, (eB + float(marg[p])) * inv_e, torch.full_like(eB, 1e6))
    wB = (wn * B_low).sum(1, keepdim=True)
    # opaque interior: blocks farther than REACH from any backing-like pixel cannot be see-through
    # (texture such as fur must not leave transparent specks there); clean backing: blocks farther than
    # REACH from any pixel off the plate are exactly transparent
    reach = max(1, math.ceil(max(2.0, min(H, W) * REACH) / f))
    hold = (1.0 - _dilate(near_low, reach)) - (1.0 - _dilate(off_plate, reach))  # +1 opaque, -1 clean
    low = torch.cat([wn, wB, F0_low, lo, inv_range, c1, inv_e, hold] + ([sig1] if prior is not None else []), 1)
    return _Plan(size=(H, W), f=f, key=key, p=p, o=o, e_key=e_key, B_low=B_low, var_n=var_n, low=low, sig0=sig0,
                 sig1=sig1)


def _key_rows(rgb: torch.Tensor, prior: torch.Tensor | None, plan: _Plan, opt: GreenPostOptions, y0: int,
              y1: int, refine=None) -> KeyFields:
    """Key rows y0..y1-1 of the image with its plan (pointwise but for the prior's dilation and the
    refiner: give those a margin of rows and crop)."""
    H, W = plan.size
    p, o = plan.p, plan.o
    x = _rows(rgb, y0, y1)
    B = _up_rows(plan.B_low, plan.size, y0, y1)
    up = _up_rows(plan.low, plan.size, y0, y1)
    wnf, wBf, F0, lof, invr, c1f, inv_ef, hold = (up[:, 0:3], up[:, 3:4], up[:, 4:7], up[:, 7:8], up[:, 8:9],
                                                  up[:, 9:10], up[:, 10:11], up[:, 11:12])
    marg = 2.0 * plan.var_n.sqrt()

    # alpha: projection, physical bounds, noise snapping
    a = x[:, 0:1] * wnf[:, 0:1]
    a.addcmul_(x[:, 1:2], wnf[:, 1:2]).addcmul_(x[:, 2:3], wnf[:, 2:3]).sub_(wBf)
    diff = x - B
    a_min = None
    for c in range(3):
        dc = diff[:, c:c + 1]
        t = torch.maximum((-dc - float(marg[c])) / B[:, c:c + 1].clamp_min(1e-3),
                          (dc - float(marg[c])) / (1 - B[:, c:c + 1]).clamp_min(1e-3))
        a_min = t if a_min is None else torch.maximum(a_min, t)
    a = torch.maximum(a, a_min)
    a = torch.minimum(a, c1f - _excess(x, p, o) * inv_ef)
    a = a.sub_(lof).mul_(invr).clamp_(0, 1)
    a = torch.maximum(a, (hold > 0.999).float()).mul_((hold > -0.999).float())

    if prior is not None:
        # where the colours barely separate object and backing (< ~6 deviations) the prior decides; it is
        # also a garbage matte (clearly outside -> 0) and a holdout matte (solid inside -> 1)
        pr = prior[y0:y1][None, None]
        conf = ((1.0 / up[:, 12:13].clamp_min(1e-6) - 2.0) / 4.0).clamp(0, 1)
        a = conf * a + (1 - conf) * pr
        r = _prior_radius(H, W)
        a = torch.maximum(a * _dilate((pr > 0.02).float(), r), _erode((pr > 0.98).float(), r))

    fields = KeyFields(key=plan.key, backing=B, alpha=a, prior_fg=F0, fg=None, noise_std=plan.var_n.sqrt(),
                       sig0_low=plan.sig0, sig1_low=plan.sig1, grid_factor=plan.f, classical_alpha=a, row0=y0,
                       image_size=plan.size)
    if refine is not None:
        a = refine(x, fields)

    if opt.clip_black > 0 or opt.clip_white < 1:
        a = ((a - opt.clip_black) / (opt.clip_white - opt.clip_black)).clamp(0, 1)

    # foreground: MAP unmixing with the local object colour as prior, then spill removal
    m = 0.02
    fg = diff.addcmul_(B, a).mul_(a).add_(F0, alpha=m).div_(a * a + m).clamp_(0, 1)
    if opt.spill_strength > 0:
        # the object's own key-colour excess (a green object) is kept; the weight rises smoothly with it,
        # so there is no seam where the nearby object colour turns greenish
        e0 = _excess(F0, p, o)
        t = ((e0 - 0.15 * plan.e_key) / (0.2 * plan.e_key)).clamp_(0, 1)
        allowed = e0.clamp_min(0) * t * t * (3 - 2 * t)
        spill = (_excess(fg, p, o) - allowed).clamp_min_(0)
        fg[:, p:p + 1].sub_(spill, alpha=opt.spill_strength)
    fields.alpha, fields.fg = a, fg
    return fields


def _prior_radius(H: int, W: int) -> int:
    return max(1, round(min(H, W) / 100))


def _key_one(rgb: torch.Tensor, prior: torch.Tensor | None, opt: GreenPostOptions, refine=None,
             out_fg: torch.Tensor | None = None, out_alpha: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key one image in row bands. rgb: (H, W, 3) (any float dtype, need not be contiguous); prior: (H, W)
    or None. Writes into / returns fg (H, W, 3) and alpha (H, W) float32."""
    H, W = rgb.shape[:2]
    plan = _plan(rgb, prior, opt)
    if out_fg is None:
        out_fg = torch.empty(H, W, 3, device=rgb.device)
    if out_alpha is None:
        out_alpha = torch.empty(H, W, device=rgb.device)
    halo = 0
    if prior is not None:
        halo = _prior_radius(H, W)
    if refine is not None:
        halo = max(halo, int(getattr(refine, "halo", 32)))
    for y0, y1 in _bands(H, W, 16):
        e0, e1 = max(0, y0 - halo), min(H, y1 + halo)
        kf = _key_rows(rgb, prior, plan, opt, e0, e1, refine)
        out_fg[y0:y1] = kf.fg[0, :, y0 - e0:y1 - e0].permute(1, 2, 0)
        out_alpha[y0:y1] = kf.alpha[0, 0, y0 - e0:y1 - e0]
    return out_fg, out_alpha


def key_fields(rgb: torch.Tensor, prior: torch.Tensor | None, opt: GreenPostOptions, refine=None) -> KeyFields:
    """Key one image and return its fields at full resolution (one band: the memory of the whole image).
    rgb: (3, H, W) float32; prior: (H, W) or None.

    `refine(x, fields) -> alpha`, if given, replaces the classical alpha (fields.alpha, (1, 1, h, W)) before
    the matte levels and the foreground unmixing (x is the image rows (1, 3, h, W); fields.fg is None then).
    greenpost() calls it per band of rows with a margin of `refine.halo` rows (default 32) on each side,
    whose results it discards: fields.row0 and fields.image_size place the band in the image."""
    hwc = rgb.permute(1, 2, 0)
    return _key_rows(hwc, prior, _plan(hwc, prior, opt), opt, 0, hwc.shape[0], refine)


# ----------------------------------------------------------------------------------------------- API

def _refine_fn(choice: str, device: torch.device):
    """The alpha refinement for a RefinerChoice value (None for 'off'): loads the shipped weights onto the
    image's device."""
    if choice == RefinerChoice.OFF.value:
        return None
    from .refiner import SHIPPED, load_refiner, refine_fields

    model = load_refiner(SHIPPED).to(device)

    def refine(x: torch.Tensor, kf: KeyFields) -> torch.Tensor:
        return refine_fields(model, x, kf)
    refine.halo = model.halo()
    refine.model = model
    return refine


def _check_image(image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image is a {type(image).__name__}: expected a torch.Tensor IMAGE (B, H, W, C) in [0, 1]")
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        hint = " (add the batch dimension with image[None])" if image.ndim == 3 else ""
        raise ValueError(f"image shape {tuple(image.shape)}: expected (B, H, W, C) with C = 1, 3 or 4{hint}")
    if min(image.shape[:3]) < 1:
        raise ValueError(f"image shape {tuple(image.shape)} is empty: every dimension must be at least 1")
    if not image.is_floating_point():
        raise ValueError(f"image dtype {image.dtype}: expected floats in [0, 1]; convert with image.float() / 255")
    img = image.float()
    lo, hi = (float(v) for v in torch.aminmax(img))  # one pass; NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("image contains NaN or infinite values: expected finite floats in [0, 1]")
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"image values span [{lo:.3g}, {hi:.3g}]: expected [0, 1]"
                         + ("; divide 8-bit images by 255" if hi > 1.5 else ""))
    return img  # clamped to [0, 1] band by band where it is read (no full-size copy)


def _check_prior(prior, shape) -> torch.Tensor | None:
    if prior is None:
        return None
    B, H, W = shape
    if not isinstance(prior, torch.Tensor):
        raise ValueError(f"prior_alpha is a {type(prior).__name__}: expected a torch.Tensor (B, H, W) or None")
    if prior.ndim == 2:
        prior = prior[None]
    if prior.ndim != 3 or tuple(prior.shape[-2:]) != (H, W) or prior.shape[0] not in (1, B):
        raise ValueError(f"prior_alpha shape {tuple(prior.shape)}: expected ({B}, {H}, {W}) or (1, {H}, {W}) to match "
                         f"the image; resize the mask to the image first")
    prior = prior.float()
    if not bool(torch.isfinite(prior).all()):
        raise ValueError("prior_alpha contains NaN or infinite values: expected an alpha in [0, 1]")
    lo, hi = float(prior.min()), float(prior.max())
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"prior_alpha values span [{lo:.3g}, {hi:.3g}]: expected [0, 1] (1 = opaque)")
    return prior.clamp(0, 1).expand(B, H, W)


EMPTY_FRACTION = 0.002  # an alpha with fewer pixels above 0.5 than this (and no prior) gets a warning


def empty_key_warning(alpha: torch.Tensor) -> str | None:
    """The warning for a key that found (almost) nothing but backing, or None. alpha: (H, W)."""
    frac = float((alpha > 0.5).float().mean())
    if frac >= EMPTY_FRACTION:
        return None
    return (f"GreenPost keyed almost everything as backing ({frac:.2%} of the pixels opaque). If the object has "
            f"the backing's own colour (a green object on green), colours alone cannot separate it: connect an "
            f"alpha prior (e.g. DiffuMatting VAE Decode's alpha) or pick key_color from the backing.")


def greenpost(image: torch.Tensor, prior_alpha: torch.Tensor | None = None,
              options: GreenPostOptions | None = None, *, prior_alpha_bhw: torch.Tensor | None = None,
              warnings: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key a batch of green-screen images.

    image: (B, H, W, C) float in [0, 1], C = 1 (grey), 3 (RGB) or 4 (RGBA: the RGB is keyed and the result's
    alpha is multiplied by the input's). prior_alpha: optional (B, H, W) alpha from a network (1 = opaque)
    to refine (`prior_alpha_bhw` is an alias). Returns (foreground (B, H, W, 3) straight colour with the
    spill removed, alpha (B, H, W), 1 = opaque), float32 on the image's device. Runs where the tensor is.
    `warnings`, if given a list, receives a message for each image that keyed to (almost) nothing without
    a prior (see `empty_key_warning`): show it to the user.
    """
    if options is None:
        options = GreenPostOptions()
    if not isinstance(options, GreenPostOptions):
        raise ValueError(f"options is a {type(options).__name__}: expected GreenPostOptions")
    if prior_alpha is not None and prior_alpha_bhw is not None:
        raise ValueError("pass the prior alpha once: prior_alpha or its alias prior_alpha_bhw, not both")
    prior_alpha = prior_alpha if prior_alpha is not None else prior_alpha_bhw
    img = _check_image(image)
    B, H, W, C = img.shape
    prior = _check_prior(prior_alpha, (B, H, W))
    if prior is not None:
        prior = prior.to(img.device)
    if C == 1:
        rgb = img.expand(B, H, W, 3)
    else:
        rgb = img[..., :3]
    fg = torch.empty(B, H, W, 3, device=img.device)
    alpha = torch.empty(B, H, W, device=img.device)
    refine = _refine_fn(options.refiner, img.device)
    with torch.no_grad():
        for i in range(B):
            _key_one(rgb[i], None if prior is None else prior[i], options, refine, fg[i], alpha[i])
            msg = None if prior is not None else empty_key_warning(alpha[i])
            if msg is not None and warnings is not None:
                warnings.append(msg if B == 1 else f"image {i + 1} of {B}: {msg}")
    if C == 4:
        alpha.mul_(img[..., 3].clamp(0, 1))
    return fg, alpha
