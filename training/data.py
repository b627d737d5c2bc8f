"""Training data: transparent objects composited onto a green backing on the fly.

Sources
- folder, layout "rgba": every *.png with an alpha channel is one object (straight alpha).
- folder, layout "pairs": an image folder (image/ images/ fg/ original/ im/) and an alpha folder
  (alpha/ alphas/ matte/ mask/ masks/), matched by file stem (the layout of the usual matting sets).
- synthetic: seeded procedural objects (models/synthetic.py random_object).
Captions: <stem>.txt beside the image (or in captions/), else data.caption_template with {name}.

Every sample is a pure function of (seed, item, variant). The object is scaled (premultiplied, so edges
get no dark fringes), placed and flipped, then composited over a backing. Two composers, one per stage:
- UNet stage: the paper's premise, a pure flat canvas of ONE key colour (data.key_color), no falloff,
  shadow, spill, noise or blur (data.unet_realism = 0);
- head stage: a varied green with light falloff, contact shadow, spill, softening and noise
  (data.head_realism), as real generations and photos have. The sample's foreground (spill included),
  backing (falloff and shadow included) and `target` satisfy target = a F + (1 - a) B exactly; the
  network input `image` is `target` softened and noised. The composition loss compares with `target`.
Pairs layout: fg/ (or foreground/) holds foreground colours and is preferred over image/ (photos); for
photos the foreground is estimated (training/foreground.py), and the log says so.
The batch of a global step is a pure function of (seed, step), so `--resume` and torchrun shards
reproduce the same data exactly.

A bad or unreadable file is reported by name and left out (counted in `report()`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..models.synthetic import Realism, green_backing, random_object

FOREGROUND_DIRS = ("fg", "foreground", "foregrounds")          # straight foreground colours (preferred)
PHOTO_DIRS = ("image", "images", "original", "im", "img", "merged", "composite")   # photos: fg is estimated
IMAGE_DIRS = FOREGROUND_DIRS + PHOTO_DIRS
ALPHA_DIRS = ("alpha", "alphas", "matte", "mattes", "mask", "masks")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
COMPOSER_VERSION = "3"   # part of the latent cache key: bump when the compositing changes
SYNTH_NOUNS = ("toy", "plush animal", "vase", "houseplant", "lamp", "sculpture", "shoe", "bag", "bottle",
               "teapot", "helmet", "doll")


@dataclass(frozen=True)
class Item:
    name: str
    caption: str
    image: str = ""        # path (folder sources)
    alpha: str = ""        # path of the alpha file (pairs layout)
    seed: int = 0          # synthetic sources
    estimate_fg: bool = False   # pairs layout: `image` is a photo, estimate its foreground colours


@dataclass
class Sample:
    """One composited training sample; float32 arrays in [0, 1]."""

    name: str
    caption: str
    image: np.ndarray      # HxWx3 green-screen composite (what the UNet learns to paint, the head's input)
    alpha: np.ndarray      # HxW ground truth
    foreground: np.ndarray  # HxWx3 straight foreground as composited (spill included)
    backing: np.ndarray    # HxWx3 backing behind the object (falloff and shadow included)
    target: np.ndarray     # HxWx3 = alpha * foreground + (1 - alpha) * backing, before softening and noise


class BadSample(Exception):
    pass


def name_to_words(stem: str) -> str:
    words = re.sub(r"[_\-.]+", " ", stem)
    words = re.sub(r"\d+", " ", words)
    return " ".join(words.split()) or "object"


def _caption_for(image_path: Path, template: str, extra_dirs=()) -> str:
    for d in (image_path.parent, *extra_dirs):
        txt = d / (image_path.stem + ".txt")
        if txt.is_file():
            try:
                text = txt.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                text = ""
            if text:
                return " ".join(text.split())
    return template.replace("{name}", name_to_words(image_path.stem))


def _find_dir(root: Path, names) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def scan_folder(root, layout: str, template: str, log=print, foreground: str = "auto") -> tuple[list[Item], list[str]]:
    """Items of a data folder and the names of files left out (with the reason).

    `foreground` (pairs layout): auto = files in fg/ are foregrounds, photos in image/ get an estimated one;
    given = use the colour files as foregrounds; estimate = estimate for every pair.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist")
    img_dir, alpha_dir = _find_dir(root, IMAGE_DIRS), _find_dir(root, ALPHA_DIRS)
    if layout == "auto":
        layout = "pairs" if img_dir is not None and alpha_dir is not None else "rgba"
    items, bad = [], []
    caption_dirs = [root / "captions"] if (root / "captions").is_dir() else []
    if layout == "pairs":
        if img_dir is None or alpha_dir is None:
            raise ValueError(f"data folder {root} has no image folder ({'/'.join(IMAGE_DIRS)}) and alpha folder "
                             f"({'/'.join(ALPHA_DIRS)}) for the pairs layout; use layout = 'rgba' for RGBA PNGs")
        alphas = {p.stem: p for p in _images_in(alpha_dir)}
        for p in _images_in(img_dir):
            a = alphas.get(p.stem)
            if a is None:
                bad.append(f"{p.name}: no alpha file named {p.stem}.* in {alpha_dir.name}/")
                continue
            est = foreground == "estimate" or (foreground == "auto" and img_dir.name not in FOREGROUND_DIRS)
            items.append(Item(p.stem, _caption_for(p, template, caption_dirs), image=str(p), alpha=str(a),
                              estimate_fg=est))
        n_est = sum(i.estimate_fg for i in items)
        if n_est:
            log(f"data: {img_dir.name}/ holds photos without foreground colours: estimating the foreground of "
                f"{n_est} pair(s) (multi-level foreground estimation); put foregrounds in fg/ to use them instead")
    else:
        for p in _images_in(root):
            if p.suffix.lower() != ".png":
                bad.append(f"{p.name}: the rgba layout reads PNGs with an alpha channel")
                continue
            try:
                with Image.open(p) as im:
                    mode = im.mode
                    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
            except Exception as e:  # noqa: BLE001 - any decoder error means: unreadable
                bad.append(f"{p.name}: unreadable ({type(e).__name__}: {e})")
                continue
            if not has_alpha:
                bad.append(f"{p.name}: no alpha channel (mode {mode})")
                continue
            items.append(Item(p.stem, _caption_for(p, template, caption_dirs), image=str(p)))
    for b in bad:
        log(f"data: skipping {b}")
    if not items:
        raise ValueError(f"data folder {root} holds no usable samples (layout {layout}); "
                         + (f"{len(bad)} file(s) were left out" if bad else "it is empty"))
    return items, bad


def synthetic_items(count: int, seed: int, offset: int = 0) -> list[Item]:
    out = []
    for i in range(count):
        s = int(seed) * 1_000_003 + offset + i
        noun = SYNTH_NOUNS[s % len(SYNTH_NOUNS)]
        out.append(Item(f"synthetic_{offset + i:06d}", f"a photo of a {noun}", seed=s))
    return out


def _read_rgba(item: Item) -> tuple[np.ndarray, np.ndarray]:
    """(colour HxWx3, alpha HxW) float32 from a folder item; raises BadSample."""
    from ..models.image_file import read_image   # 8/16-bit and float files by value (issue 13)

    try:
        arr = read_image(item.image)
        if item.alpha:
            rgb = arr[..., :3]
            a = read_image(item.alpha)[..., 0]
        else:
            if arr.shape[-1] != 4:
                raise ValueError("no alpha channel")
            rgb, a = arr[..., :3], arr[..., 3]
    except Exception as e:  # noqa: BLE001 - any decoder error means: unreadable
        raise BadSample(f"{Path(item.image).name}: unreadable ({type(e).__name__}: {e})") from None
    if a.shape != rgb.shape[:2]:
        raise BadSample(f"{Path(item.image).name}: alpha is {a.shape[1]}x{a.shape[0]}, the image "
                        f"{rgb.shape[1]}x{rgb.shape[0]}")
    if float(a.max()) <= 0.0:
        raise BadSample(f"{Path(item.image).name}: fully transparent (alpha is 0 everywhere)")
    return np.ascontiguousarray(rgb), np.ascontiguousarray(a)


def _crop_to_object(fg, a):
    ys, xs = np.nonzero(a > 1e-3)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return fg[y0:y1, x0:x1], a[y0:y1, x0:x1]


def resize_premultiplied(fg: np.ndarray, a: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize a straight foreground and its alpha to size (w, h) without dark fringes.

    Colours are premultiplied by alpha before resampling and divided again after, so transparent pixels
    (whose colour is arbitrary, often black) do not bleed into the edge.
    """
    nw, nh = size
    k = nw / max(1, a.shape[1])
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
    pm = cv2.resize(np.ascontiguousarray(fg * a[..., None]), (nw, nh), interpolation=interp).reshape(nh, nw, 3)
    ar = np.clip(cv2.resize(np.ascontiguousarray(a), (nw, nh), interpolation=interp).reshape(nh, nw), 0, 1)
    fg_out = np.where(ar[..., None] > 1e-4, pm / np.maximum(ar[..., None], 1e-4), 0.0)
    return np.clip(fg_out, 0, 1).astype(np.float32), ar.astype(np.float32)


def contact_shadow(backing: np.ndarray, alpha: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """The backing darkened by a soft shadow of the object, offset down and sideways."""
    if strength <= 0:
        return backing
    h, w = alpha.shape
    dy = max(1, int(round(h * rng.uniform(0.02, 0.08))))
    dx = int(round(w * rng.uniform(-0.05, 0.05)))
    sh = np.zeros_like(alpha)
    ys, yd = slice(0, h - dy), slice(dy, h)
    if dx >= 0:
        sh[yd, dx:] = alpha[ys, : w - dx]
    else:
        sh[yd, : w + dx] = alpha[ys, -dx:]
    sh = cv2.GaussianBlur(sh, (0, 0), max(1.0, min(h, w) / 25))
    return (backing * (1.0 - strength * np.clip(sh, 0, 1))[..., None]).astype(np.float32)


def green_spill(fg: np.ndarray, alpha: np.ndarray, backing: np.ndarray, amount: float) -> np.ndarray:
    """The foreground tinted toward the backing near the object's edge (light bounced off the screen)."""
    if amount <= 0:
        return fg
    h, w = alpha.shape
    inner = cv2.GaussianBlur(alpha, (0, 0), max(1.0, min(h, w) / 60))
    near_edge = np.clip(1 - inner, 0, 1)[..., None]
    tint = np.array([0.3, 1.0, 0.3], np.float32)
    return np.clip(fg + amount * near_edge * (backing - fg) * tint, 0, 1).astype(np.float32)


def random_key(rng: np.random.Generator) -> tuple[float, float, float]:
    """A green screen colour as real backings vary (darker/lighter, bluer/yellower)."""
    return (float(rng.uniform(0.05, 0.3)), float(rng.uniform(0.6, 0.9)), float(rng.uniform(0.05, 0.35)))


class Composer:
    """Turns an item into a composited Sample at `resolution`, seeded by (seed, item index, variant).

    `key`: one fixed key colour (r, g, b), or None for a random green per sample. `realism` 0..1 scales
    light falloff, contact shadow, spill, softening and noise (0: a pure flat canvas of the key colour).
    """

    def __init__(self, resolution: int, seed: int, scale=(0.55, 0.95), flip: bool = True, realism: float = 1.0,
                 key: tuple[float, float, float] | None = None):
        self.res = int(resolution)
        self.seed = int(seed)
        self.scale = scale
        self.flip = flip
        self.realism = float(realism)
        self.key = None if key is None else tuple(float(c) for c in key)

    def rng(self, index: int, variant: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, 0x5EED, int(index), int(variant)])

    def _object(self, item: Item, rng) -> tuple[np.ndarray, np.ndarray]:
        """The item's foreground and alpha cropped to the object, scaled to its canvas size and flipped."""
        r = self.res
        if item.image:
            fg, a = _read_rgba(item)
        else:
            fg, a = random_object(r, r, item.seed, hair=bool(item.seed % 3), translucent=bool(item.seed % 2))
        fg, a = _crop_to_object(fg, a)
        h, w = a.shape
        side = rng.uniform(*self.scale) * r
        k = side / max(h, w)
        nh, nw = max(1, min(r, int(round(h * k)))), max(1, min(r, int(round(w * k))))
        if item.estimate_fg:
            from .foreground import estimate_foreground

            interp = cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
            photo = np.clip(cv2.resize(fg, (nw, nh), interpolation=interp), 0, 1).reshape(nh, nw, 3)
            a = np.clip(cv2.resize(a, (nw, nh), interpolation=interp), 0, 1).reshape(nh, nw)
            fg = estimate_foreground(photo, a)
        else:
            fg, a = resize_premultiplied(fg, a, (nw, nh))
        if self.flip and rng.random() < 0.5:
            fg, a = fg[:, ::-1], a[:, ::-1]
        return fg, a

    def __call__(self, item: Item, index: int, variant: int) -> Sample:
        r = self.res
        rng = self.rng(index, variant)
        fg, a = self._object(item, rng)
        nh, nw = a.shape
        y0 = int(rng.integers(0, r - nh + 1))
        x0 = int(rng.integers(0, r - nw + 1))
        fgc = np.zeros((r, r, 3), np.float32)
        ac = np.zeros((r, r), np.float32)
        fgc[y0:y0 + nh, x0:x0 + nw] = fg
        ac[y0:y0 + nh, x0:x0 + nw] = a
        s = self.realism
        falloff, spill = rng.uniform(0, 0.35) * s, rng.uniform(0, 0.25) * s
        noise, blur, shadow = rng.uniform(0, 0.012) * s, rng.uniform(0, 0.6) * s, rng.uniform(0, 0.35) * s
        key = self.key if self.key is not None else random_key(rng)
        bseed = int(rng.integers(0, 2**31 - 1))
        backing = green_backing(r, r, bseed, Realism(falloff=falloff, shadow=0.0, spill=0.0, noise=0.0), key=key)
        backing = contact_shadow(backing, ac, shadow, rng)
        fg_spilled = green_spill(fgc, ac, backing, spill)
        target = (ac[..., None] * fg_spilled + (1 - ac[..., None]) * backing).astype(np.float32)
        image = target
        if blur > 0:
            image = cv2.GaussianBlur(image, (0, 0), blur)
        if noise > 0:
            image = image + np.random.default_rng(bseed).normal(0, noise, image.shape).astype(np.float32)
        image = np.clip(image, 0, 1).astype(np.float32)
        return Sample(item.name, item.caption, image, ac, fg_spilled, backing, target)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x0DE4, int(epoch)]).permutation(n)


def global_positions(step: int, batch: int, rank: int = 0, world: int = 1) -> range:
    """Positions (in the endless epoch-by-epoch stream) of this rank's share of global step `step`."""
    per = batch // world
    start = step * batch + rank * per
    return range(start, start + per)


class StepData:
    """The batch of each global step for one rank: a pure function of (seed, step, rank, world).

    `batch(step)` -> list of (Sample, item_index, variant). A file that fails to load is reported once,
    remembered, and replaced by the next good item of the same epoch's order.
    """

    def __init__(self, items: list[Item], composer: Composer, seed: int, batch: int, rank: int = 0, world: int = 1,
                 variants: int | None = None, log=print):
        self.items = items
        self.composer = composer
        self.seed = seed
        self.batch_size = batch
        self.rank, self.world = rank, world
        self.variants = variants          # None: a fresh augmentation each epoch, else epoch % variants
        self.bad: dict[int, str] = {}
        self.log = log

    def report(self) -> list[str]:
        return list(self.bad.values())

    def _sample(self, pos: int):
        n = len(self.items)
        epoch, k = divmod(pos, n)
        order = epoch_order(self.seed, epoch, n)
        variant = epoch if self.variants is None else epoch % self.variants
        for j in range(n):
            idx = int(order[(k + j) % n])
            if idx in self.bad:
                continue
            try:
                return self.composer(self.items[idx], idx, variant), idx, variant
            except BadSample as e:
                self.bad[idx] = str(e)
                self.log(f"data: skipping {e}")
        raise ValueError("every sample of the data set failed to load; see the messages above")

    def batch(self, step: int) -> list:
        return [self._sample(p) for p in global_positions(step, self.batch_size, self.rank, self.world)]


def cache_key(item: Item, variant: int, resolution: int, seed: int, vae_id: str) -> str:
    """Content key of a cached latent: the file (path, size, mtime) or synthetic seed + augmentation."""
    ident = [COMPOSER_VERSION, item.name, item.image, item.alpha, str(item.seed), str(variant), str(resolution),
             str(seed), vae_id]
    for p in (item.image, item.alpha):
        if p:
            try:
                st = Path(p).stat()
                ident += [str(st.st_size), str(st.st_mtime_ns)]
            except OSError:
                pass
    return hashlib.sha1("\x1f".join(ident).encode()).hexdigest()
