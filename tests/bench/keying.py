"""Green-screen keying benchmark: GreenPost against tuned classical peers, on a tune and a validation split
and on two independent backing generators.

Data: the 18 alphamatting.com training photos with ground-truth alpha (../shared/data/alphamatting_dev,
not shipped with the pack; the script says so and exits 0 when it is absent). Each photo is scaled to
--size pixels on its long side; its straight foreground F is estimated from (photo, gt alpha) with
pymatting's multi-level foreground estimation and shot over a backing by three generators:
- flat:      one flat clean green, no noise (models/synthetic.py FLAT);
- synthetic: models/synthetic.py's uneven backing (light falloff, contact shadow, spill, softening, noise,
             JPEG), per-image variation of each effect: the generator GreenPost was designed against;
- photo:     tests/bench/photo_backing.py, written independently of it: cloth in linear light with lens
             vignetting, wrinkles at several scales, colour-temperature drift, contact shadow, bounce
             light, camera-shake motion blur, channel-correlated sensor noise, JPEG with 4:2:0 chroma.
Split: GT01-GT12 is the tune split (every constant of GreenPost and every peer parameter was or is tuned
there), GT13-GT18 the validation split, never tuned on. Both are printed.

Methods (same images, same run):
- greenpost: models/greenpost.py with its defaults (auto key: it is not told the key colour) and the shipped
  refiner forced on; greenpost_classical: the same with the refiner off (the classical key alone);
- vlahos_max / vlahos_avg: colour difference a = 1 - (K - L) / (Kk - Lk), K the key's dominant channel,
  L = max or mean of the other two, then matte levels (black/white clip) tuned on the tune split of each
  generator (best median SAD over a grid), the backing removed (I - (1 - a) K), unpremultiplied, and the
  matching despill K <= L;
- ffmpeg: ffmpeg's `chromakey` (similarity/blend tuned the same way) + `despill`, through PNG files;
- cf_ml: pymatting's closed-form alpha on a trimap from the tuned vlahos_max key (>= 0.95 fg, <= 0.05 bg,
  the band between dilated by 3 px unknown) + pymatting's estimate_foreground_ml.
Peers get the key colour an artist would pick: the median of the known-backing (trimap == 0) pixels, and
their parameters are tuned per generator (in their favour: GreenPost has one set of constants).

Metrics (tests/support/metrics.py, DIM / alphamatting.com definitions): SAD over the whole image (a keyer
must keep the backing clean), SAD and MSE over the unknown band (the benchmark trimap's band, plus any
partial ground-truth pixel), Gradient and Connectivity over the whole image, FG colour = alpha-weighted
mean absolute error of the straight foreground where gt alpha > 0. Per split: the median over images with
the interquartile range; ratio = GreenPost's median / the best peer's median, per metric. Printed beside
them, not part of the targets: FG edge, the same foreground error where 0 < gt < 1 only (in the opaque
interior every keyer returns the photo's own pixels, so there FG colour measures the photo's noise).

Speed (one core: torch, OpenCV and BLAS limited to one thread): CPU seconds per megapixel on a 1024 x 1024
photo shot, median of repeats (CPU time, since the machine's cores may be shared; wall time printed beside
it). Every method is timed from arrays in to arrays out: ffmpeg's figure is its chromakey pipeline minus
the same ffmpeg call with only the format conversion (process start and PNG I/O), so no method is charged
I/O. Memory: peak RSS of a fresh process that loads a 4096 x 4096 8-bit image and keys it (the whole
process, Python and torch included).

Targets (issue 8): on the validation split and on the photo generator every metric <= 0.5x the best peer
(FG colour on the flat backing <= 1.0x); classical <= 0.2 s/MP and refiner <= 0.4 s/MP on one core; 16 MP
within 2 GB. The last line printed is machine-readable:
`refiner_s_per_mp=<median> classical_s_per_mp=<median> peak_16mp_gb=<peak RSS keying 4096x4096>`.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "alphamatting_dev"
sys.path.append(str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _package  # noqa: E402  the pack as `diffumatting` (see _package.py)

_package.register()

METRICS = ("sad", "sad_unk", "mse", "grad", "conn", "fg")  # the metrics (the summary and its targets)
# Printed beside them, a diagnostic: FG colour where 0 < gt < 1 only. In the opaque interior every keyer
# returns the photo's own pixels, so there `fg` measures the photo's noise and JPEG, not the keyer.
REPORTED = METRICS + ("fg_edge",)
LABELS = {"sad": "SAD", "sad_unk": "SAD unknown", "mse": "MSE unknown x1e3", "grad": "Grad", "conn": "Conn",
          "fg": "FG colour x1e3", "fg_edge": "FG edge x1e3 (diagnostic)"}
SCALE = {"sad": 1, "sad_unk": 1, "mse": 1e3, "grad": 1, "conn": 1, "fg": 1e3, "fg_edge": 1e3}
TUNE = tuple(f"GT{i:02d}" for i in range(1, 13))
GENERATORS = ("flat", "synthetic", "photo")


# ------------------------------------------------------------------------------------------- data

def load_photos(size: int, limit: int | None):
    """(name, photo float RGB, gt alpha, trimap) scaled to `size` on the long side."""
    from PIL import Image

    out = []
    names = sorted(p.stem for p in (DATA / "input").glob("GT*.png"))
    if limit:
        names = names[:limit] + [n for n in names if n not in TUNE][:max(1, limit // 3)]
        names = sorted(set(names))
    for name in names:
        img = np.asarray(Image.open(DATA / "input" / f"{name}.png").convert("RGB"), np.float32) / 255
        gt = np.asarray(Image.open(DATA / "gt" / f"{name}.png").convert("L"), np.float32) / 255
        tri = np.asarray(Image.open(DATA / "trimap1" / f"{name}.png").convert("L"))
        h, w = gt.shape
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        gt = np.clip(cv2.resize(gt, (nw, nh), interpolation=cv2.INTER_AREA), 0, 1)
        tri = cv2.resize(tri, (nw, nh), interpolation=cv2.INTER_NEAREST)
        out.append((name, np.clip(img, 0, 1), gt, tri))
    return out


def _sample(name, image, alpha, fg, tri):
    unknown = (tri == 128) | ((alpha > 0.002) & (alpha < 0.998))
    return dict(name=name, split="tune" if name in TUNE else "val", image=np.clip(image, 0, 1).astype(np.float32),
                alpha=alpha.astype(np.float32), fg=np.clip(fg, 0, 1).astype(np.float32), trimap=tri,
                unknown=unknown, known_bg=(tri == 0) & (alpha < 0.002))


def build(size: int, limit: int | None, gens) -> dict[str, list[dict]]:
    """Every generator's samples (dicts with image, alpha, fg, trimap, unknown, split)."""
    from photo_backing import shoot
    from pymatting import estimate_foreground_ml

    from diffumatting.models import synthetic

    sets = {g: [] for g in gens}
    for i, (name, photo, gt, tri) in enumerate(load_photos(size, limit)):
        seed = 1000 + int(name[2:])
        fg = np.clip(estimate_foreground_ml(photo.astype(np.float64), gt.astype(np.float64)), 0, 1).astype(np.float32)
        h, w = gt.shape
        if "flat" in sets:
            b = synthetic.green_backing(h, w, seed, synthetic.FLAT)
            sets["flat"].append(_sample(name, synthetic.composite(fg, gt, b, seed, synthetic.FLAT), gt, fg, tri))
        if "synthetic" in sets:
            rng = np.random.default_rng(seed)
            real = replace(synthetic.REALISTIC, falloff=float(rng.uniform(0.2, 0.45)),
                           shadow=float(rng.uniform(0.2, 0.5)),
                           spill=float(rng.uniform(0.15, 0.35)), noise=float(rng.uniform(0.006, 0.018)),
                           blur=float(rng.uniform(0.4, 0.8)), jpeg_quality=int(rng.integers(80, 95)))
            b = synthetic.green_backing(h, w, seed, real)
            sets["synthetic"].append(_sample(name, synthetic.composite(fg, gt, b, seed, real), gt, fg, tri))
        if "photo" in sets:
            shot = shoot(fg, gt, seed)
            sets["photo"].append(_sample(name, shot.image, shot.alpha, shot.foreground, tri))
    return sets


# ------------------------------------------------------------------------------------------- methods

def picked_key(sample) -> np.ndarray:
    sel = sample["known_bg"]
    return np.median(sample["image"][sel], axis=0) if sel.any() else np.array([0.1, 0.7, 0.2], np.float32)


def _greenpost_options(classical: bool):
    """GreenPost's default options with the refiner set explicitly: off for `greenpost_classical`, the
    shipped network for `greenpost` (whatever the default is, each row measures what it names)."""
    from diffumatting.models.greenpost import GreenPostOptions, RefinerChoice

    choice = RefinerChoice.OFF if classical else RefinerChoice.SHIPPED
    return replace(GreenPostOptions(), refiner=choice.value)


def _run_greenpost(image, classical: bool):
    import torch

    from diffumatting.models.greenpost import greenpost

    fg, a = greenpost(torch.from_numpy(image)[None], options=_greenpost_options(classical))
    return a[0].numpy(), fg[0].numpy()


def run_greenpost(sample, params=None):
    return _run_greenpost(sample["image"], classical=False)


def run_greenpost_classical(sample, params=None):
    return _run_greenpost(sample["image"], classical=True)


def _vlahos_raw(img: np.ndarray, k: np.ndarray, mode: str):
    p = int(np.argmax(k))
    o = [c for c in range(3) if c != p]

    def lim(x):
        return np.maximum(x[..., o[0]], x[..., o[1]]) if mode == "max" else 0.5 * (x[..., o[0]] + x[..., o[1]])

    a = 1 - (img[..., p] - lim(img)) / max(1e-3, float(k[p] - lim(k[None, None])[0, 0]))
    return a, p, lim


def _vlahos(sample, mode: str, levels=(0.0, 1.0)):
    img = sample["image"]
    k = picked_key(sample)
    a, p, lim = _vlahos_raw(img, k, mode)
    lo, hi = levels
    a = np.clip((a - lo) / (hi - lo), 0, 1)
    fg = np.clip((img - (1 - a)[..., None] * k) / np.maximum(a, 1e-3)[..., None], 0, 1)
    fg[a <= 1e-3] = img[a <= 1e-3]
    fg[..., p] = np.minimum(fg[..., p], lim(fg))
    return a.astype(np.float32), fg.astype(np.float32)


def run_vlahos_max(sample, params=None):
    return _vlahos(sample, "max", (params or {}).get("levels", (0.0, 1.0)))


def run_vlahos_avg(sample, params=None):
    return _vlahos(sample, "avg", (params or {}).get("levels", (0.0, 1.0)))


def _ffmpeg(image: np.ndarray, vf: str) -> np.ndarray:
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="gp_bench_"))
    try:
        src, dst = tmp / "in.png", tmp / "out.png"
        Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(src)
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-threads", "1", "-filter_threads", "1", "-i", str(src),
                        "-vf", vf, "-pix_fmt", "rgba", str(dst)], check=True)
        return np.asarray(Image.open(dst).convert("RGBA"), np.float32) / 255
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_ffmpeg(sample, params=None):
    params = params or {}
    sim, bl = params.get("similarity", 0.12), params.get("blend", 0.08)
    k = np.clip(picked_key(sample) * 255 + 0.5, 0, 255).astype(int)
    kind = ("green", "blue")[int(np.argmax(k) == 2)]
    out = _ffmpeg(sample["image"], f"format=rgba,chromakey=color=0x{k[0]:02x}{k[1]:02x}{k[2]:02x}:similarity={sim}"
                                   f":blend={bl},despill=type={kind}")
    return out[..., 3], out[..., :3]


def run_cf_ml(sample, params=None):
    from pymatting import estimate_alpha_cf, estimate_foreground_ml

    a0, _ = _vlahos(sample, "max", (params or {}).get("levels", (0.0, 1.0)))
    band = ((a0 > 0.05) & (a0 < 0.95)).astype(np.uint8)
    band = cv2.dilate(band, np.ones((7, 7), np.uint8)) > 0
    tri = np.where(a0 >= 0.95, 1.0, 0.0)
    tri[band] = 0.5
    img = sample["image"].astype(np.float64)
    a = tri if not (tri == 0.5).any() else np.clip(estimate_alpha_cf(img, tri), 0, 1)
    fg = np.clip(estimate_foreground_ml(img, a), 0, 1)
    return a.astype(np.float32), fg.astype(np.float32)


METHODS = {"greenpost": run_greenpost, "greenpost_classical": run_greenpost_classical,
           "vlahos_max": run_vlahos_max, "vlahos_avg": run_vlahos_avg, "ffmpeg": run_ffmpeg, "cf_ml": run_cf_ml}
OURS = ("greenpost", "greenpost_classical")

LEVEL_GRID = [(lo, hi) for lo in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4) for hi in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)]
FFMPEG_GRID = [dict(similarity=s, blend=b) for s in (0.06, 0.1, 0.14, 0.18) for b in (0.02, 0.06, 0.12)]
FFMPEG_GRID_QUICK = [dict(similarity=s, blend=b) for s in (0.08, 0.14) for b in (0.03, 0.1)]


def tune_peers(tune_samples, methods, full: bool) -> dict[str, dict]:
    """Peer parameters with the best median SAD on the tune split (in the peers' favour)."""
    from support.metrics import sad

    def best(fn, grid):
        scores = [(float(np.median([sad(fn(x, g)[0], x["alpha"]) for x in tune_samples])), i)
                  for i, g in enumerate(grid)]
        return grid[min(scores)[1]]

    params: dict[str, dict] = {}
    for mode in ("max", "avg"):
        params[f"vlahos_{mode}"] = {"levels": best(lambda x, g: _vlahos(x, mode, g), LEVEL_GRID)}
    params["cf_ml"] = params["vlahos_max"]
    if "ffmpeg" in methods:
        params["ffmpeg"] = best(run_ffmpeg, FFMPEG_GRID if full else FFMPEG_GRID_QUICK)
    return params


# ------------------------------------------------------------------------------------------- evaluation

def evaluate(samples, methods, params) -> dict[str, dict[str, list[float]]]:
    """Per method, per metric, the per-image values (in the samples' order)."""
    from support.metrics import all_metrics

    res = {}
    for mname in methods:
        vals = {k: [] for k in REPORTED}
        for x in samples:
            a, fg = METHODS[mname](x, params.get(mname))
            m = all_metrics(a, x["alpha"], x["unknown"], fg, x["fg"])
            for k in REPORTED:
                vals[k].append(m[k])
        res[mname] = vals
    return res


def _stats(v: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return float(med), float(q1), float(q3)


def ratios(res: dict, ours: str) -> dict[str, tuple[float, str]]:
    """GreenPost's median / the best peer's median, per reported metric."""
    peers = [m for m in res if m not in OURS]
    out = {}
    for k in REPORTED:
        best = min(peers, key=lambda n: _stats(res[n][k])[0])
        out[k] = (_stats(res[ours][k])[0] / max(_stats(res[best][k])[0], 1e-12), best)
    return out


def table(title: str, res: dict, idx: list[int]) -> tuple[str, dict]:
    lines = [f"#### {title}", "", "| method | " + " | ".join(LABELS[k] for k in REPORTED) + " |",
             "|---|" + "---|" * len(REPORTED)]
    sub = {m: {k: [v[i] for i in idx] for k, v in r.items()} for m, r in res.items()}
    for name, r in sub.items():
        cells = []
        for k in REPORTED:
            med, q1, q3 = (s * SCALE[k] for s in _stats(r[k]))
            cells.append(f"{med:.3g} [{q1:.3g}-{q3:.3g}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rat = {}
    for ours in OURS:
        if ours in sub and any(m not in OURS for m in sub):
            rat[ours] = ratios(sub, ours)
            lines.append(f"| **{ours} / best peer** | " + " | ".join(f"**{rat[ours][k][0]:.2f}** ({rat[ours][k][1]})"
                                                                    for k in REPORTED) + " |")
    return "\n".join(lines), rat


# ------------------------------------------------------------------------------------------- speed, memory

def _speed_sample(size: int = 1024):
    from photo_backing import shoot

    from diffumatting.models import synthetic

    fg, alpha = synthetic.random_object(size, size, 5)
    shot = shoot(fg, alpha, 5)
    tri = np.where(shot.alpha <= 0.002, 0, np.where(shot.alpha >= 0.998, 255, 128)).astype(np.uint8)
    return _sample("speed", shot.image, shot.alpha, shot.foreground, tri)


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (ffmpeg): unlike wall time, it
    does not grow when other jobs share the machine's cores."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def speed(methods, params, repeats: int) -> dict[str, tuple[float, float]]:
    """Per method (median CPU s/MP, median wall s/MP), arrays in to arrays out, one thread."""
    x = _speed_sample()
    mp = x["alpha"].size / 1e6
    out = {}
    for name in methods:
        fn = METHODS[name]
        fn(x, params.get(name))  # warm-up
        cpu, wall = [], []
        for _ in range(repeats):
            c, t = _cpu_seconds(), time.perf_counter()
            fn(x, params.get(name))
            dc, dt = _cpu_seconds() - c, time.perf_counter() - t
            if name == "ffmpeg":  # take off process start and PNG I/O: the same call with no keying
                c, t = _cpu_seconds(), time.perf_counter()
                _ffmpeg(x["image"], "format=rgba")
                dc, dt = dc - (_cpu_seconds() - c), dt - (time.perf_counter() - t)
            cpu.append(dc)
            wall.append(dt)
        out[name] = (float(np.median(cpu)) / mp, float(np.median(wall)) / mp)
    return out


def _rss_child(path: str, classical: bool) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    from diffumatting.models.greenpost import greenpost

    arr = np.load(path)
    img = torch.from_numpy(arr).float().div_(255.0)[None]
    del arr
    fg, a = greenpost(img, options=_greenpost_options(classical))
    print(f"peak_rss_kb={_own_peak_kb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}")


def _own_peak_kb(maxrss_kb: int) -> int:
    """This process's own peak RSS in kB: VmHWM of its memory map (Linux). getrusage's ru_maxrss is kept
    across exec, so a child started from a big parent (the benchmark holds every photo by then) reports
    at least the parent's resident size; VmHWM starts afresh with the exec'd program."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return maxrss_kb


def peak_rss_16mp(classical: bool) -> float:
    """Peak RSS (GB, 1e9 bytes) of a fresh process keying one 4096 x 4096 photo shot."""
    x = _speed_sample(1024)
    big = cv2.resize(x["image"], (4096, 4096), interpolation=cv2.INTER_CUBIC)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "img16.npy")
        np.save(path, (np.clip(big, 0, 1) * 255 + 0.5).astype(np.uint8))
        del big
        cmd = [sys.executable, __file__, "--rss-child", path] + (["--classical"] if classical else [])
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    kb = int(r.stdout.strip().splitlines()[-1].split("=")[1])
    return kb * 1024 / 1e9


# ------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="full run: photos at their native long side (800 px), cf_ml included, 5 speed repeats "
                         "(about 20-30 minutes on 2 cores); the default is a quick run (a few minutes)")
    ap.add_argument("--size", type=int, default=None, help="long side in pixels (default 320, 800 with --full)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N photos (plus a few validation "
                                                             "photos) for a quick look")
    ap.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--generators", default=",".join(GENERATORS), help="comma-separated subset of "
                                                                        + ",".join(GENERATORS))
    ap.add_argument("--no-memory", action="store_true", help="skip the 16 MP peak-RSS measurement")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--classical", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        _rss_child(args.rss_child, args.classical)
        return 0
    size = args.size or (800 if args.full else 320)
    if size < 32:
        ap.error(f"--size {size}: expected at least 32 pixels")
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit {args.limit}: expected a positive number of photos")
    default_methods = list(METHODS)
    if not args.full and args.methods is None:
        default_methods.remove("cf_ml")
    methods = [m for m in (args.methods or ",".join(default_methods)).split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    gens = [g for g in args.generators.split(",") if g]
    if [g for g in gens if g not in GENERATORS] or not gens:
        ap.error(f"--generators {args.generators!r}: choose from {list(GENERATORS)}")
    if not (DATA / "input").is_dir():
        print(f"keying benchmark skipped: shared data not found at {DATA}")
        return 0
    if "ffmpeg" in methods and shutil.which("ffmpeg") is None:
        print("ffmpeg not found on PATH: the ffmpeg peer is left out")
        methods.remove("ffmpeg")
    import platform

    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    sets = build(size, args.limit, gens)
    n_tune = sum(x["split"] == "tune" for x in sets[gens[0]])
    print(f"## Keying benchmark ({'full' if args.full else 'quick'}): {len(sets[gens[0]])} photos "
          f"({n_tune} tune, {len(sets[gens[0]]) - n_tune} validation), long side {size}px; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, timings on 1 thread")
    summary = []
    params_all = {}
    for g in gens:
        samples = sets[g]
        tune_idx = [i for i, x in enumerate(samples) if x["split"] == "tune"]
        val_idx = [i for i, x in enumerate(samples) if x["split"] == "val"]
        params = tune_peers([samples[i] for i in tune_idx], methods, args.full)
        params_all[g] = params
        res = evaluate(samples, methods, params)
        print(f"\n### {g} backing (peer parameters tuned on the tune split: {params})\n")
        for split, idx in (("tune", tune_idx), ("validation", val_idx)):
            if not idx:
                continue
            text, rat = table(f"{g}, {split} split (median [IQR] over {len(idx)} images)", res, idx)
            print(text + "\n")
            for ours, r in rat.items():
                summary.append((g, split, ours, r))
    print("### Summary: GreenPost median / best peer median (target <= 0.5; FG colour on flat <= 1.0)\n")
    print("| backing | split | method | " + " | ".join(LABELS[k].split(" x")[0] for k in METRICS) + " | met |")
    print("|---|---|---|" + "---|" * len(METRICS) + "---|")
    for g, split, ours, r in summary:
        ok = all(r[k][0] <= (1.0 if (g == "flat" and k == "fg") else 0.5) for k in METRICS)
        print(f"| {g} | {split} | {ours} | " + " | ".join(f"{r[k][0]:.2f}" for k in METRICS)
              + f" | {'yes' if ok else 'no'} |")

    repeats = 5 if args.full else 3
    speed_methods = [m for m in methods if m != "cf_ml"]
    sp = speed(speed_methods, params_all.get("photo", next(iter(params_all.values()))), repeats)
    print(f"\n### Speed, 1024 x 1024 photo shot, one thread, median of {repeats} (arrays in, arrays out)\n")
    print(f"CPU time is the figure (the machine's cores are shared; load average {os.getloadavg()[0]:.1f}); "
          f"wall time for reference.\n")
    print("| method | CPU s/MP | wall s/MP |\n|---|---|---|")
    for name, (c, w) in sp.items():
        print(f"| {name} | {c:.3f} | {w:.3f} |")
    nan = (float("nan"), float("nan"))
    classical, refined = sp.get("greenpost_classical", nan)[0], sp.get("greenpost", nan)[0]
    peak = float("nan")
    if not args.no_memory:
        peak = peak_rss_16mp(classical=False)
        print(f"\n16 MP (4096 x 4096) keyed in a fresh process, default options (refiner on): peak RSS {peak:.2f} GB "
              f"(target 2 GB)")
        print(f"  classical path: peak RSS {peak_rss_16mp(classical=True):.2f} GB")
    print(f"\nclassical {classical:.3f} s/MP (target 0.2), refiner {refined:.3f} s/MP (target 0.4)")
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    print(f"refiner_s_per_mp={refined:.4f} classical_s_per_mp={classical:.4f} peak_16mp_gb={peak:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
