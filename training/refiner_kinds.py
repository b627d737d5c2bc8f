"""The object kinds of the refiner's training data: one builder per kind, (Ctx) -> (alpha, premultiplied).

See training/refiner_objects.py for the drawing model (supersampled coverage, layers joined with "over").
"""
from __future__ import annotations

import math
import string

import cv2
import numpy as np

from .refiner_objects import (HAIR_COLOURS, FONTS, Cover, Ctx, Layers, bezier, blob, blur_premultiplied,
                              disk_kernel, edge_points, fbm, grow, hsv_rgb, pick_style, shade, texture)

# strand widths in pixels and how often each is used (most hair is thinner than a pixel)
STRAND_WIDTHS = np.array([0.25, 0.5, 0.75, 1.0, 1.5])
STRAND_P = np.array([0.3, 0.3, 0.2, 0.12, 0.08])


def _solid_layer(ctx: Ctx, layers: Layers, outline: np.ndarray, base: np.ndarray, style: str,
                 angle: float = 0.0, defocus: float = 0.0) -> np.ndarray:
    """Fill an outline with a shaded textured surface; returns the shape's coverage."""
    a = Cover(ctx.h, ctx.w).fill([outline]).alpha()
    col = texture(ctx, base, style, angle) * shade(a, ctx.rng)
    if defocus > 0:
        a2, p2 = blur_premultiplied(a, col * a[..., None], disk_kernel(defocus))
        layers.over_premult(a2, p2)
    else:
        layers.over(a, col)
    return a


def _strand_layers(ctx: Ctx, layers: Layers, curves: np.ndarray, base: np.ndarray, opacity=(0.55, 1.0),
                   widths=STRAND_WIDTHS, p=STRAND_P, taper: bool = True) -> None:
    """Draw curves (N, K, 2) as strands of colour `base`: grouped by width, each group with its own shade
    and opacity, the groups joined with "over" (on one channel: shade; the colour is base * shade).
    With taper, the outer third of each strand is drawn one width step thinner."""
    r = ctx.rng
    n, k = curves.shape[:2]
    group = r.choice(len(widths), n, p=p / p.sum())
    cut = k * 2 // 3
    a_acc = np.zeros((ctx.h, ctx.w), np.float32)
    s_acc = np.zeros((ctx.h, ctx.w), np.float32)
    for g in range(len(widths)):
        sel = curves[group == g]
        if not len(sel):
            continue
        cov = Cover(ctx.h, ctx.w)
        if taper and g > 0:
            cov.lines(sel[:, :cut + 1], widths[g]).lines(sel[:, cut:], widths[g - 1])
        else:
            cov.lines(sel, widths[g])
        a = cov.alpha() * np.float32(r.uniform(*opacity))
        keep = 1.0 - a
        s_acc *= keep
        s_acc += np.float32(r.uniform(0.7, 1.35)) * a
        a_acc *= keep
        a_acc += a
    shade_field = s_acc / np.maximum(a_acc, 1e-6)
    layers.over(a_acc, base[None, None, :].astype(np.float32) * shade_field[..., None])


def _hair_colour(ctx: Ctx) -> np.ndarray:
    if ctx.key_tinted or ctx.rng.random() < 0.1:
        return ctx.colour(sat=(0.3, 0.9), val=(0.2, 0.9))
    return HAIR_COLOURS[ctx.rng.integers(len(HAIR_COLOURS))] * ctx.rng.uniform(0.8, 1.15)


def _clumped_strands(ctx: Ctx, roots: np.ndarray, heading: np.ndarray, lengths: np.ndarray, n_strands: int,
                     gravity: float = 0.0, curl: float = 0.05, wave: float = 0.0) -> np.ndarray:
    """Hair in clumps: each clump a spine grown from a root along `heading` (angles), its strands offset
    across it, converging toward the tips (clumped) or fraying, ending at different lengths; `wave` (px)
    is the amplitude of a sideways wave along each clump."""
    r = ctx.rng
    n_clumps = len(roots)
    k = 14
    spines = grow(r, roots, heading, lengths, k=k, curl=curl, wiggle=r.uniform(0.01, 0.06), gravity=gravity)
    tan = np.gradient(spines, axis=1)
    tan /= np.maximum(np.linalg.norm(tan, axis=2, keepdims=True), 1e-6)
    nrm = np.stack([-tan[..., 1], tan[..., 0]], 2)
    c = r.integers(0, n_clumps, n_strands)
    t = np.linspace(0, 1, k)[None, :]
    width = r.uniform(0.5, 5.0, n_clumps)[c, None]
    off0 = r.normal(0, 1, (n_strands, 1)) * width
    converge = r.uniform(-1.5, 0.9, n_clumps)[c, None]       # > 0: tips meet (wet, clumped); < 0: fray
    walk = np.cumsum(r.normal(0, 0.25, (n_strands, k)), axis=1) * r.uniform(0.2, 1.0)
    off = off0 * (1 - converge * t) + walk
    if wave > 0:
        period = r.uniform(8, 60, n_clumps)[c, None]
        off = off + wave * np.sin(2 * np.pi * t * lengths[c, None] / period + r.uniform(0, 6.3, n_clumps)[c, None])
    frac = r.uniform(0.4, 1.0, (n_strands, 1))              # strands end at different lengths
    u = (t * frac) * (k - 1)
    i0 = np.clip(np.floor(u).astype(int), 0, k - 2)
    fr = (u - i0)[..., None]
    base = spines[c[:, None], i0] * (1 - fr) + spines[c[:, None], i0 + 1] * fr
    nn = nrm[c[:, None], i0]
    return base + nn * off[..., None]


def _angle(v: np.ndarray) -> np.ndarray:
    return np.arctan2(v[:, 1], v[:, 0])


def hair(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Hair: a head of messy hair flowing one way, long hair falling from a head, or a lock coming in
    from the frame's edge. Clumped, tapered strands of sub-pixel to 1.5 px width that start under the
    hair mass's surface (so its edge thins out gradually), plus stray flyaways."""
    r, m = ctx.rng, ctx.m
    layers = Layers(ctx.h, ctx.w)
    colour = _hair_colour(ctx)
    variant = str(r.choice(["head", "long", "lock"], p=[0.45, 0.35, 0.2]))
    gravity, curl = 0.0, r.uniform(0.0, 0.12)
    if variant in ("head", "long"):
        centre = ctx.point(0.0)
        if variant == "long":
            centre[1] = r.uniform(-0.25, 0.35) * ctx.h
        head = blob(r, centre, r.uniform(0.15, 0.4) * m, aspect=r.uniform(0.7, 1.3), rough=0.15)
        a = _solid_layer(ctx, layers, head, colour, "fur", angle=r.uniform(0, np.pi))
        roots, normals = edge_points(r, a, int(r.integers(60, 250)))
        if not len(roots):
            roots, normals = ctx.point(0.2)[None], np.array([[0.0, 1.0]])
        roots = roots - normals * r.uniform(0, 0.04 * m, (len(roots), 1))  # emerge from under the surface
        if variant == "long":  # falls from the head's sides and bottom, pulled down
            heading = _angle(normals + np.array([0.0, r.uniform(0.5, 1.5)]))
            lengths = m * r.uniform(0.3, 1.1, len(roots))
            gravity = r.uniform(0.06, 0.2)
        else:  # messy: outward plus a combed flow direction
            flow = r.normal(0, 1, 2) * r.uniform(0.0, 1.3)
            heading = _angle(normals + flow) + r.normal(0, 0.3, len(roots))
            lengths = m * (0.02 + 0.4 * r.beta(1.2, 3.0, len(roots)))
            gravity = r.choice([0.0, r.uniform(0.02, 0.08)])
    else:  # a lock of hair coming in from the frame's edge
        n = int(r.integers(10, 40))
        side = r.integers(4)
        s = r.uniform(0.1, 0.9, n)
        roots = np.stack([s * ctx.w, np.full(n, -2.0)], 1) if side == 0 else np.stack([np.full(n, -2.0), s * ctx.h], 1)
        normals = np.tile([[0.0, 1.0]] if side == 0 else [[1.0, 0.0]], (n, 1))
        if side >= 2:
            roots = np.array([ctx.w, ctx.h]) - roots
            normals = -normals
        heading = _angle(normals) + r.normal(0, 0.4, n)
        lengths = m * r.uniform(0.3, 1.0, n)
    n_strands = int(r.integers(300, 1500))
    wave = r.uniform(0.5, 5.0) if variant != "head" or r.random() < 0.3 else 0.0
    curves = _clumped_strands(ctx, roots, heading, lengths, n_strands, gravity=gravity, curl=curl, wave=wave)
    _strand_layers(ctx, layers, curves, colour)
    fly = int(r.integers(0, 30))
    if fly:
        pick = r.integers(0, len(roots), fly)
        stray = grow(r, roots[pick], heading[pick] + r.normal(0, 0.8, fly), r.uniform(0.1, 0.5, fly) * m,
                     k=16, curl=0.08, wiggle=0.06, gravity=gravity * 0.5)
        _strand_layers(ctx, layers, stray, colour, opacity=(0.3, 0.9), widths=STRAND_WIDTHS[:2], p=STRAND_P[:2])
    return layers.result()


def fur(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """A plush or furry body: opaque fibrous interior, and a dense fringe of short fibres along its
    outline pointing outward."""
    r, m = ctx.rng, ctx.m
    layers = Layers(ctx.h, ctx.w)
    colour = ctx.colour(sat=(0.0, 0.8), val=(0.15, 0.95)) if r.random() < 0.6 else _hair_colour(ctx)
    centre = ctx.point(0.05)
    outline = blob(r, centre, r.uniform(0.2, 0.5) * m, aspect=r.uniform(0.6, 1.4), rough=0.3)
    a = _solid_layer(ctx, layers, outline, colour, "fur", angle=r.uniform(0, np.pi))
    perim = max(1.0, float(cv2.arcLength(outline.astype(np.float32).reshape(-1, 1, 2), True)))
    n = int(min(4000, perim * r.uniform(0.8, 3.5)))
    pts, nrm = edge_points(r, a, n)
    if len(pts):
        length = r.uniform(2.0, 0.08 * m + 3.0) * r.uniform(0.4, 1.0, n)
        start = pts - nrm * (length * r.uniform(0.2, 0.6, n))[:, None]
        curves = grow(r, start, np.arctan2(nrm[:, 1], nrm[:, 0]) + r.normal(0, r.uniform(0.2, 0.7), n),
                      length, k=5, curl=0.1, wiggle=0.05)
        _strand_layers(ctx, layers, curves, colour, opacity=(0.5, 1.0), widths=STRAND_WIDTHS[:3], p=STRAND_P[:3])
    return layers.result()


def wire(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Cables and thin wires crossing the frame (some coiled), dark, metallic or coloured, with a
    specular line along them; sometimes attached to a solid part."""
    r, m = ctx.rng, ctx.m
    layers = Layers(ctx.h, ctx.w)
    if r.random() < 0.4:
        _solid_layer(ctx, layers, blob(r, ctx.point(0.0), r.uniform(0.08, 0.25) * m, rough=0.1), ctx.colour(),
                     pick_style(r))
    for _ in range(int(r.integers(1, 7))):
        ends = r.uniform(-0.2, 1.2, (4, 2)) * np.array([ctx.w, ctx.h])
        path = bezier(ends, 64)
        if r.random() < 0.25:  # a coil along the path
            tan = np.gradient(path, axis=0)
            tan /= np.maximum(np.linalg.norm(tan, axis=1, keepdims=True), 1e-6)
            ph = np.linspace(0, r.uniform(6, 30) * np.pi, len(path))
            path = path + np.stack([-tan[:, 1], tan[:, 0]], 1) * (r.uniform(2, 0.05 * m + 2) * np.sin(ph))[:, None]
            path = cv2.resize(path.reshape(-1, 1, 2), (1, len(path) * 4), interpolation=cv2.INTER_LINEAR).reshape(-1, 2)
        width = float(np.exp(r.uniform(np.log(0.3), np.log(4.0))))
        a = Cover(ctx.h, ctx.w).lines([path], width).alpha()
        base = (np.full(3, r.uniform(0.02, 0.5), np.float32) * r.uniform(0.9, 1.1, 3) if r.random() < 0.6
                else ctx.colour())
        col = np.broadcast_to(base, (ctx.h, ctx.w, 3)).copy()
        if width > 0.8:
            nx = np.array([r.normal(), r.normal()])
            hl = Cover(ctx.h, ctx.w).lines([path + nx / max(np.linalg.norm(nx), 1e-6) * width * 0.25],
                                           width * 0.3).alpha()[..., None]
            col = col * (1 - hl) + hl * np.clip(base + r.uniform(0.2, 0.6), 0, 1)
        layers.over(a * (1.0 if r.random() < 0.8 else r.uniform(0.5, 0.9)), col)
    return layers.result()


def mesh(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """A net or fence (two families of warped lines over a region) or a perforated plate with holes."""
    r, m = ctx.rng, ctx.m
    layers = Layers(ctx.h, ctx.w)
    base = (np.full(3, r.uniform(0.05, 0.8), np.float32) if r.random() < 0.5 else ctx.colour())
    if r.random() < 0.3:  # perforated plate
        outline = blob(r, ctx.point(0.1), r.uniform(0.25, 0.6) * m, aspect=r.uniform(0.7, 1.4), rough=0.1)
        cov = Cover(ctx.h, ctx.w).fill([outline])
        pitch = r.uniform(5, 0.12 * m + 5)
        rad = pitch * r.uniform(0.15, 0.42)
        ang = r.uniform(0, np.pi)
        g = np.arange(-m, 2 * m, pitch)
        gx, gy = np.meshgrid(g, g)
        gx = gx + (np.arange(len(g))[:, None] % 2) * pitch * 0.5 * (r.random() < 0.5)
        c, s = math.cos(ang), math.sin(ang)
        px, py = c * gx - s * gy + ctx.w / 2, s * gx + c * gy + ctx.h / 2
        keep = (px > -pitch) & (px < ctx.w + pitch) & (py > -pitch) & (py < ctx.h + pitch)
        th = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        circ = np.stack([np.cos(th), np.sin(th)], 1) * rad
        cov.fill([circ + np.array([x, y]) for x, y in zip(px[keep], py[keep])], value=0)
        a = cov.alpha()
        layers.over(a, texture(ctx, base, "smooth") * shade(a, r))
        return layers.result()
    pitch = r.uniform(3, 0.1 * m + 4)
    width = float(np.exp(r.uniform(np.log(0.3), np.log(min(3.0, pitch * 0.3)))))
    n = int(2 * m / pitch) + 4
    v = np.linspace(-1.0 * m, 1.0 * m, 64)
    lines = []
    skew = math.radians(r.uniform(30, 90) if r.random() < 0.5 else 90.0)
    for rot in (0.0, skew):  # two families of parallel strings, crossing at `skew`
        for i in range(n):
            u = (i - n / 2) * pitch
            lines.append(np.stack([u * math.cos(rot) - v * math.sin(rot), u * math.sin(rot) + v * math.cos(rot)], 1))
    pts = np.stack(lines)
    # the whole net: rotated, sagging (one smooth displacement field for every string), foreshortened
    ang = r.uniform(0, np.pi)
    c, s_ = math.cos(ang), math.sin(ang)
    pts = pts @ (np.array([[c, -s_], [s_, c]]) * r.uniform(0.7, 1.3)).T
    amp, k = r.uniform(0, 0.05 * m), r.uniform(0.5, 3.0) * 2 * np.pi / m
    phase = r.uniform(0, 2 * np.pi, 2)
    pts = pts + amp * np.stack([np.sin(pts[..., 1] * k + phase[0]), np.sin(pts[..., 0] * k + phase[1])], -1)
    pts = pts * (1 + r.uniform(-0.3, 0.3) * pts[..., 1:2] / m) + np.array([ctx.w, ctx.h]) / 2
    a = Cover(ctx.h, ctx.w).lines(pts, width).alpha()
    if r.random() < 0.7:  # only a region of the frame holds the net
        region = Cover(ctx.h, ctx.w).fill([blob(r, ctx.point(0.1), r.uniform(0.3, 0.7) * m, rough=0.15)]).alpha()
        a = a * region
    layers.over(a, texture(ctx, base, "smooth"))
    return layers.result()


def _leaf(r: np.random.Generator, base: np.ndarray, angle: float, length: float) -> np.ndarray:
    """Leaf outline (N, 2): width profile along the midrib, with serrated (toothed) edges."""
    t = np.linspace(0, 1, 60)
    width = length * r.uniform(0.15, 0.45) * np.sin(np.pi * t ** r.uniform(0.6, 1.2)) ** r.uniform(0.6, 1.4)
    if r.random() < 0.6:
        teeth = r.uniform(6, 20)
        width = width * (1 + r.uniform(0.05, 0.2) * (((t * teeth) % 1.0) - 0.5))
    side = np.concatenate([np.stack([t * length, width], 1), np.stack([t[::-1] * length, -width[::-1]], 1)])
    side[:, 1] += length * r.normal(0, 0.06) * np.sin(np.pi * side[:, 0] / length)  # bent midrib
    c, s = math.cos(angle), math.sin(angle)
    return side @ np.array([[c, s], [-s, c]]) + base


def _grass(ctx: Ctx, layers: Layers, colour) -> None:
    """A tuft of grass: long thin tapered blades from the bottom edge, bending over."""
    r, m = ctx.rng, ctx.m
    n = int(r.integers(8, 60))
    x0 = r.uniform(0.2, 0.8) * ctx.w
    roots = np.stack([x0 + r.normal(0, 0.08 * m, n), np.full(n, ctx.h + 2.0)], 1)
    ang = -np.pi / 2 + r.normal(0, 0.35, n)
    blades = grow(r, roots, ang, r.uniform(0.3, 1.0, n) * m, k=16, curl=r.uniform(0.0, 0.05), wiggle=0.02,
                  gravity=r.uniform(0.0, 0.06))
    tan = np.gradient(blades, axis=1)
    tan /= np.maximum(np.linalg.norm(tan, axis=2, keepdims=True), 1e-6)
    nrm = np.stack([-tan[..., 1], tan[..., 0]], 2)
    half = (r.uniform(0.4, 3.0, n)[:, None] * (1 - np.linspace(0, 1, 16))[None, :])[..., None]
    outlines = np.concatenate([blades + nrm * half, (blades - nrm * half)[:, ::-1]], 1)
    for g in range(2):
        sel = outlines[g::2]
        a = Cover(ctx.h, ctx.w).fill(list(sel)).alpha()
        layers.over(a, texture(ctx, colour() if callable(colour) else colour, "smooth"))


def foliage(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """A leafy sprig (stem from the frame edge, thin side stems, serrated leaves with a lighter midrib)
    or a tuft of grass blades; often green, the hard case on a green backing."""
    r, m = ctx.rng, ctx.m
    layers = Layers(ctx.h, ctx.w)
    green = r.random() < 0.7 or ctx.key_tinted

    def leaf_colour():
        if ctx.key_tinted:
            return ctx.colour()
        if green:
            return hsv_rgb(r.uniform(60, 160), r.uniform(0.3, 0.9), r.uniform(0.12, 0.7))
        return ctx.colour(sat=(0.4, 1.0), val=(0.2, 0.9))
    if r.random() < 0.25:
        _grass(ctx, layers, leaf_colour)
        return layers.result()
    stem_col = hsv_rgb(r.uniform(30, 100), r.uniform(0.3, 0.7), r.uniform(0.2, 0.6))
    ctrl = np.array([r.uniform(0, ctx.w), ctx.h + 2])[None] + np.cumsum(r.normal(0, 0.3 * m, (4, 2)), 0) * [1, 0.3]
    ctrl[1:, 1] = ctx.h + 2 - np.cumsum(r.uniform(0.15, 0.35, 3) * ctx.h)
    stem = bezier(ctrl, 48)
    stems, leaves = [stem], []
    leaf_len = r.uniform(0.06, 0.2) * m
    for i in r.integers(5, len(stem), int(r.integers(4, 16))):
        tan = stem[min(i + 1, len(stem) - 1)] - stem[i - 1]
        ang = math.atan2(tan[1], tan[0]) + r.choice([-1, 1]) * r.uniform(0.4, 1.3)
        sub = grow(r, stem[i][None], np.array([ang]), np.array([r.uniform(0.02, 0.2) * m]), k=8, curl=0.05)[0]
        stems.append(sub)
        leaves.append(_leaf(r, sub[-1], ang + r.normal(0, 0.3), leaf_len * r.uniform(0.6, 1.4)))
    tip = stem[-1] - stem[-2]
    leaves.append(_leaf(r, stem[-1], math.atan2(tip[1], tip[0]), leaf_len))
    a_main = Cover(ctx.h, ctx.w).lines([stem], r.uniform(1.0, 4.0)).alpha()
    a_sub = Cover(ctx.h, ctx.w).lines(stems[1:], r.uniform(0.3, 1.5)).alpha()
    layers.over(np.maximum(a_main, a_sub), stem_col)
    groups = r.integers(0, 3, len(leaves))
    for g in range(3):
        sel = [lf for lf, gg in zip(leaves, groups) if gg == g]
        if not sel:
            continue
        a = Cover(ctx.h, ctx.w).fill(sel).alpha()
        base = leaf_colour()
        col = texture(ctx, base, "smooth")
        half = len(sel[0]) // 2  # outline: one margin base to tip, then the other back
        midribs = [np.stack([lf[0], lf[half - 1]]) for lf in sel]
        veins = Cover(ctx.h, ctx.w).lines(midribs, 0.6).alpha()[..., None] * a[..., None]
        col = col * (1 - 0.35 * veins) + 0.35 * veins * np.clip(base * 1.6 + 0.05, 0, 1)
        layers.over(a, col)
    return layers.result()


def glass(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Translucent objects: a glass vessel (thin interior alpha, denser rim, specular streaks, tinted), or a
    sheer fabric veil with folds; sometimes an opaque cap."""
    r, m = ctx.rng, ctx.m
    layers = Layers(ctx.h, ctx.w)
    tint = ctx.colour(sat=(0.0, 0.6), val=(0.5, 1.0))
    cx, top = r.uniform(0.25, 0.75) * ctx.w, r.uniform(0.0, 0.3) * ctx.h
    height = r.uniform(0.5, 1.0) * ctx.h
    if r.random() < 0.65:  # vessel: symmetric profile
        y = np.linspace(0, 1, 40)
        prof = r.uniform(0.08, 0.25) * m * (1 + sum(r.uniform(-0.3, 0.3) * np.sin(np.pi * k * y + r.uniform(0, 3))
                                                     for k in (1, 2, 3)))
        prof = np.clip(prof, 0.02 * m, None)
        right = np.stack([cx + prof, top + y * height], 1)
        left = np.stack([cx - prof[::-1], top + y[::-1] * height], 1)
        outline = np.concatenate([right, left])
        cov = Cover(ctx.h, ctx.w).fill([outline]).alpha()
        d = cv2.distanceTransform((cov > 0.5).astype(np.uint8), cv2.DIST_L2, 3)
        a_in, a_rim = r.uniform(0.04, 0.45), r.uniform(0.5, 1.0)
        alpha = cov * (a_in + (a_rim - a_in) * np.exp(-d / r.uniform(0.8, 4.0)))
        col = np.broadcast_to(tint, (ctx.h, ctx.w, 3)).copy()
        for _ in range(int(r.integers(0, 3))):  # specular streaks
            x0 = cx + r.uniform(-0.7, 0.7) * float(prof.mean())
            streak = np.stack([np.full(20, x0) + r.normal(0, 1, 20).cumsum() * 0.3, top + np.linspace(0.1, 0.9, 20) * height], 1)
            hl = Cover(ctx.h, ctx.w).lines([streak], r.uniform(0.7, 4.0)).alpha() * cov
            hl = cv2.GaussianBlur(hl, (0, 0), r.uniform(0.3, 1.5))
            k = r.uniform(0.5, 0.95)
            alpha = alpha + hl * k * (1 - alpha)
            col = col * (1 - hl[..., None]) + hl[..., None] * np.clip(tint + 0.5, 0, 1)
        layers.over(np.clip(alpha, 0, 1), col)
        if r.random() < 0.4:  # opaque cap
            cap_w = float(prof[0]) * r.uniform(0.5, 1.0)
            cap = np.array([[cx - cap_w, top - 0.08 * m], [cx + cap_w, top - 0.08 * m], [cx + cap_w, top + 2],
                            [cx - cap_w, top + 2]])
            _solid_layer(ctx, layers, cap, ctx.colour(), "smooth")
    else:  # sheer fabric
        outline = blob(r, ctx.point(0.1), r.uniform(0.25, 0.6) * m, aspect=r.uniform(0.6, 1.5), rough=0.35)
        cov = Cover(ctx.h, ctx.w).fill([outline]).alpha()
        yy, xx = np.mgrid[0:ctx.h, 0:ctx.w].astype(np.float32)
        ang = r.uniform(0, np.pi)
        u = xx * math.cos(ang) + yy * math.sin(ang) + 8 * fbm(r, ctx.h, ctx.w, m / 3, octaves=2)
        folds = 0.5 + 0.5 * np.sin(u / r.uniform(3, 0.08 * m + 3))
        alpha = cov * np.clip(r.uniform(0.15, 0.5) + r.uniform(0.1, 0.4) * folds, 0, 1)
        col = texture(ctx, tint, "smooth") * (0.8 + 0.3 * folds[..., None])
        layers.over(alpha, col)
    return layers.result()


def smoke(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """A smoke plume or drifting mist: turbulent density (warped fractal noise) in a widening column,
    alpha soft everywhere; often with its opaque source (an incense stick, a chimney)."""
    r, m, h, w = ctx.rng, ctx.m, ctx.h, ctx.w
    layers = Layers(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x0, y0 = r.uniform(0.2, 0.8) * w, r.uniform(0.7, 1.1) * h
    warp = r.uniform(0.02, 0.1) * m
    dx = warp * fbm(r, h, w, m / 4, octaves=3)
    dy = warp * fbm(r, h, w, m / 4, octaves=3)
    X, Y = xx + dx, yy + dy
    rise = np.clip((y0 - Y) / m, 0, None)
    if r.random() < 0.7:
        drift = r.normal(0, 0.3) * rise ** 1.5 * m
        width = (r.uniform(0.01, 0.05) + r.uniform(0.1, 0.5) * rise) * m
        env = np.exp(-((X - x0 - drift) / width) ** 2) * (Y < y0) * np.exp(-rise * r.uniform(0, 1.5))
    else:  # mist patch
        c = ctx.point(0.2)
        rad = r.uniform(0.2, 0.5) * m
        env = np.exp(-(((X - c[0]) ** 2 + (Y - c[1]) ** 2) / (rad * rad)) ** 2)
    turb = fbm(r, h, w, m / r.uniform(3, 10), octaves=5)
    warped = cv2.remap(turb, X.astype(np.float32), Y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    dens = env * np.clip(0.6 + 0.5 * warped, 0, None)
    thr = r.uniform(0.05, 0.25)
    alpha = np.clip((dens - thr) / (1 - thr), 0, 1) ** r.uniform(0.7, 1.5) * r.uniform(0.3, 0.95)
    grey = r.uniform(0.45, 0.95)
    tint = np.clip(grey * (1 + r.normal(0, 0.04, 3)), 0, 1).astype(np.float32)
    col = tint * (1 - r.uniform(0.0, 0.35) * np.clip(dens, 0, 1))[..., None]
    if r.random() < 0.6:
        sw = r.uniform(0.5, 0.04 * m + 1)
        src = np.array([[x0 - sw, y0], [x0 + sw, y0], [x0 + sw, h + 5], [x0 - sw, h + 5]])
        _solid_layer(ctx, layers, src, ctx.colour(), "smooth")
    layers.over(alpha.astype(np.float32), col)
    return layers.result()


def text(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Cut-out lettering: Hershey fonts at several sizes, sometimes outlined, sometimes rotated."""
    r = ctx.rng
    layers = Layers(ctx.h, ctx.w)
    font = int(r.choice(FONTS))
    n_lines = int(r.integers(1, 4))
    scale_px = r.uniform(0.15, 0.45) * ctx.h / n_lines      # cap height in final pixels
    fs = scale_px * 4 / 22.0                                 # Hershey glyphs are ~22 units tall at scale 1
    thick = max(1, int(round(r.uniform(0.08, 0.22) * scale_px * 4)))
    outline = r.random() < 0.35
    inner = Cover(ctx.h, ctx.w)
    outer = Cover(ctx.h, ctx.w) if outline else None
    o_thick = thick + max(2, int(r.uniform(0.05, 0.15) * scale_px * 4))
    for i in range(n_lines):
        word = "".join(r.choice(list(string.ascii_letters + string.digits + "&?!"), int(r.integers(2, 9))))
        org = (int(r.uniform(-0.1, 0.5) * ctx.w * 4), int((r.uniform(0.15, 0.3) + i / n_lines * 0.75) * ctx.h * 4))
        if outer is not None:
            cv2.putText(outer.c, word, org, font, fs, 255, o_thick, cv2.LINE_AA)
        cv2.putText(inner.c, word, org, font, fs, 255, thick, cv2.LINE_AA)
    if r.random() < 0.4:
        rot = cv2.getRotationMatrix2D((ctx.w * 2, ctx.h * 2), r.uniform(-35, 35), 1.0)
        for cov in (inner, outer):
            if cov is not None:
                cov.c = cv2.warpAffine(cov.c, rot, (ctx.w * 4, ctx.h * 4), flags=cv2.INTER_LINEAR)
    if outer is not None:
        layers.over(outer.alpha(), ctx.colour())
    layers.over(inner.alpha(), texture(ctx, ctx.colour(), str(r.choice(["smooth", "print", "speckle"]))))
    return layers.result()


def solid(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """One to three opaque objects (blobs, boxes, rings, handles) with textured interiors, fur-like
    ones included; sometimes out of focus (soft edges from a disk blur of the premultiplied layer)."""
    r, m = ctx.rng, ctx.m
    layers = Layers(ctx.h, ctx.w)
    for _ in range(int(r.integers(1, 4))):
        c = ctx.point(0.0)
        size = r.uniform(0.1, 0.5) * m
        shape = r.integers(4)
        if shape == 0:
            outline = blob(r, c, size, aspect=r.uniform(0.5, 1.5), rough=r.uniform(0.0, 0.5))
        elif shape == 1:  # box with rounded corners
            outline = blob(r, c, size, aspect=r.uniform(0.5, 1.5), rough=0.0)
            outline = c + np.sign(outline - c) * np.abs(outline - c) ** 0.5 * size ** 0.5
        elif shape == 2:  # convex polygon
            pts = c + r.normal(0, size, (int(r.integers(3, 9)), 2))
            outline = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)
        else:  # handle / thick curved bar
            outline = None
        base = ctx.colour()
        defocus = r.uniform(0.7, 3.5) if r.random() < 0.2 else 0.0
        if outline is None:
            path = bezier(c + r.normal(0, size, (4, 2)), 40)
            a = Cover(ctx.h, ctx.w).lines([path], r.uniform(2, 0.08 * m + 2)).alpha()
            col = texture(ctx, base, "smooth") * shade(a, r)
            layers.over(a, col)
            continue
        if r.random() < 0.2:  # ring: a hole through the object
            cov = Cover(ctx.h, ctx.w).fill([outline])
            cov.fill([c + (outline - c) * r.uniform(0.3, 0.6)], value=0)
            a = cov.alpha()
            layers.over(a, texture(ctx, base, pick_style(r)) * shade(a, r))
            continue
        _solid_layer(ctx, layers, outline, base, pick_style(r), angle=r.uniform(0, np.pi), defocus=defocus)
    return layers.result()


def greenish(ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Objects of the key's own hue (green on green, blue on blue), darker, paler or more saturated than
    the backing: solid, furry, hairy, leafy or translucent."""
    ctx.key_tinted = True
    try:
        which = str(ctx.rng.choice(["solid", "solid", "fur", "hair", "foliage", "glass"]))
        return KIND_BUILDERS[which](ctx)
    finally:
        ctx.key_tinted = False


KIND_BUILDERS = {"hair": hair, "fur": fur, "wire": wire, "mesh": mesh, "foliage": foliage, "glass": glass,
                 "smoke": smoke, "text": text, "solid": solid, "greenish": greenish}
