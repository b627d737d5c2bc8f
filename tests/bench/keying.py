"""Green-screen keying benchmark: GreenPost against colour-difference, ffmpeg and closed-form peers.

Data: the 18 alphamatting.com training photos with ground-truth alpha (../shared/data/alphamatting_dev,
not shipped with the pack; the script skips with a message when it is absent). Each photo is scaled to
--size pixels on its long side; its straight foreground F is estimated from (photo, gt alpha) with
pymatting's multi-level foreground estimation, then composited over a green backing:
- realistic: models/synthetic.py's uneven backing and composite (light falloff, contact shadow, green
  spill near the edges, softening, noise, JPEG), with seeded per-image variation of each effect;
- flat: one flat clean green, no noise.

Methods (all in this run, on the same images):
- greenpost: models/greenpost.py, auto key (it is not told the key colour);
- vlahos_max / vlahos_avg: colour difference a = 1 - (G - L) / (Gk - Lk), L = max(R,B) or (R+B)/2, the
  backing colour removed (I - (1 - a) K) and unpremultiplied, then the matching despill G <= L;
- ffmpeg: Debian's ffmpeg `chromakey` (similarity/blend picked as the best of a small grid on the
  realistic set's SAD, i.e. tuned in the peer's favour) + `despill=type=green`, through PNG files;
- cf_ml: pymatting's closed-form alpha on a trimap from the vlahos_max key (>= 0.95 fg, <= 0.05 bg,
  the band between dilated by 3 px unknown) + pymatting's estimate_foreground_ml.
The peers get the key colour K an artist would pick: the median colour of the known backing
(trimap == 0) pixels. GreenPost estimates its own.

Metrics (models/metrics.py): SAD, Gradient and Connectivity over the whole image (a keyer must keep the
backing clean too; / 1000), MSE over the benchmark trimap's unknown band (x 1e3 in the table), and the
foreground error (alpha-weighted mean absolute error of F where gt alpha > 0, x 1e3; "FG edge": the same
only where 0 < gt alpha < 1). Means over images.
Speed: seconds per megapixel on one core (torch, OpenCV, numba and BLAS limited to one thread; ffmpeg
with -threads 1, its time includes process start and PNG files), over the benchmark images (small, so
fixed per-call costs weigh in) and on one 1024 x 1024 image (the figure the 0.2 s/MP target refers to).

Target (issue 2): on the realistic set every GreenPost metric <= 0.5 x the best peer's, and <= 0.2 s/MP.
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
import _package  # noqa: E402  the pack as `diffumatting` (see _package.py)

_package.register()

METRICS = ("sad", "mse", "grad", "conn", "fg", "fg_edge")


def load_set(size: int, limit: int | None):
    """(name, photo float RGB, gt alpha, trimap) scaled to `size` on the long side."""
    from PIL import Image

    out = []
    names = sorted(p.stem for p in (DATA / "input").glob("GT*.png"))[:limit]
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


def build(size: int, limit: int | None):
    """Both benchmark sets: lists of dicts with image, alpha, fg, trimap."""
    from pymatting import estimate_foreground_ml

    from diffumatting.models import synthetic as S

    sets = {"realistic": [], "flat": []}
    for i, (name, photo, gt, tri) in enumerate(load_set(size, limit)):
        fg = np.clip(estimate_foreground_ml(photo.astype(np.float64), gt.astype(np.float64)), 0, 1).astype(np.float32)
        h, w = gt.shape
        rng = np.random.default_rng(1000 + i)
        real = replace(S.REALISTIC, falloff=float(rng.uniform(0.2, 0.45)), shadow=float(rng.uniform(0.2, 0.5)),
                       spill=float(rng.uniform(0.15, 0.35)), noise=float(rng.uniform(0.006, 0.018)),
                       blur=float(rng.uniform(0.4, 0.8)), jpeg_quality=int(rng.integers(80, 95)))
        backing = S.green_backing(h, w, 1000 + i, real)
        image = S.composite(fg, gt, backing, 1000 + i, real)
        sets["realistic"].append(dict(name=name, image=image, alpha=gt, fg=fg, trimap=tri))
        flat_b = S.green_backing(h, w, 1000 + i, S.FLAT)
        sets["flat"].append(dict(name=name, image=S.composite(fg, gt, flat_b, 1000 + i, S.FLAT), alpha=gt, fg=fg,
                                 trimap=tri))
    return sets


# ------------------------------------------------------------------------------------------- methods

def picked_key(sample) -> np.ndarray:
    return np.median(sample["image"][sample["trimap"] == 0], axis=0)


def run_greenpost(sample):
    import torch

    from diffumatting.models.greenpost import GreenPostOptions, greenpost

    fg, a = greenpost(torch.from_numpy(sample["image"])[None], options=GreenPostOptions(**OPTS))
    return a[0].numpy(), fg[0].numpy()


def _vlahos(sample, mode: str):
    img = sample["image"]
    k = picked_key(sample)

    def lim(x):
        return np.maximum(x[..., 0], x[..., 2]) if mode == "max" else 0.5 * (x[..., 0] + x[..., 2])

    a = 1 - (img[..., 1] - lim(img)) / max(1e-3, float(k[1] - lim(k[None, None])[0, 0]))
    a = np.clip(a, 0, 1)
    fg = np.clip((img - (1 - a)[..., None] * k) / np.maximum(a, 1e-3)[..., None], 0, 1)
    fg[a <= 1e-3] = img[a <= 1e-3]
    fg[..., 1] = np.minimum(fg[..., 1], lim(fg))
    return a.astype(np.float32), fg.astype(np.float32)


def run_vlahos_max(sample):
    return _vlahos(sample, "max")


def run_vlahos_avg(sample):
    return _vlahos(sample, "avg")


FFMPEG_PARAMS = {"similarity": 0.12, "blend": 0.08}


def run_ffmpeg(sample, similarity=None, blend=None):
    from PIL import Image

    sim = FFMPEG_PARAMS["similarity"] if similarity is None else similarity
    bl = FFMPEG_PARAMS["blend"] if blend is None else blend
    k = np.clip(picked_key(sample) * 255 + 0.5, 0, 255).astype(int)
    tmp = Path(tempfile.mkdtemp(prefix="gp_bench_"))
    try:
        src, dst = tmp / "in.png", tmp / "out.png"
        Image.fromarray((np.clip(sample["image"], 0, 1) * 255 + 0.5).astype(np.uint8)).save(src)
        vf = (f"format=rgba,chromakey=color=0x{k[0]:02x}{k[1]:02x}{k[2]:02x}:similarity={sim}:blend={bl},"
              f"despill=type=green")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-threads", "1", "-filter_threads", "1", "-i", str(src),
                        "-vf", vf, "-pix_fmt", "rgba", str(dst)], check=True)
        out = np.asarray(Image.open(dst).convert("RGBA"), np.float32) / 255
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out[..., 3], out[..., :3]


def run_cf_ml(sample):
    from pymatting import estimate_alpha_cf, estimate_foreground_ml

    a0, _ = _vlahos(sample, "max")
    band = ((a0 > 0.05) & (a0 < 0.95)).astype(np.uint8)
    band = cv2.dilate(band, np.ones((7, 7), np.uint8)) > 0
    tri = np.where(a0 >= 0.95, 1.0, 0.0)
    tri[band] = 0.5
    img = sample["image"].astype(np.float64)
    if not (tri == 0.5).any():
        a = tri
    else:
        a = np.clip(estimate_alpha_cf(img, tri), 0, 1)
    fg = np.clip(estimate_foreground_ml(img, a), 0, 1)
    return a.astype(np.float32), fg.astype(np.float32)


OPTS: dict = {}
METHODS = {"greenpost": run_greenpost, "vlahos_max": run_vlahos_max, "vlahos_avg": run_vlahos_avg,
           "ffmpeg": run_ffmpeg, "cf_ml": run_cf_ml}


def tune_ffmpeg(samples) -> None:
    """Pick chromakey's similarity/blend with the best mean SAD on `samples` (in the peer's favour)."""
    from diffumatting.models.metrics import sad

    best = None
    for sim in (0.06, 0.1, 0.14, 0.18):
        for bl in (0.02, 0.06, 0.12):
            s = float(np.mean([sad(run_ffmpeg(x, sim, bl)[0], x["alpha"]) for x in samples]))
            if best is None or s < best[0]:
                best = (s, sim, bl)
    FFMPEG_PARAMS.update(similarity=best[1], blend=best[2])


def evaluate(samples, methods):
    from diffumatting.models.metrics import all_metrics

    res = {}
    for mname in methods:
        fn = METHODS[mname]
        fn(samples[0])  # warm-up (JIT, imports)
        vals = {k: [] for k in METRICS}
        secs = 0.0
        mp = 0.0
        for x in samples:
            t = time.perf_counter()
            a, fg = fn(x)
            secs += time.perf_counter() - t
            mp += x["alpha"].size / 1e6
            m = all_metrics(a, x["alpha"], x["trimap"] == 128, fg, x["fg"])
            for k in METRICS:
                vals[k].append(m[k])
        res[mname] = {k: float(np.mean(v)) for k, v in vals.items()}
        res[mname]["s_per_mp"] = secs / mp
    return res


def speed_1mp(methods, repeats: int = 3) -> dict[str, float]:
    """Seconds per megapixel on one 1024 x 1024 synthetic green screen (models/synthetic.py), best of
    `repeats`: at the benchmark's small sizes fixed per-call costs dominate."""
    from diffumatting.models import synthetic as S

    comp = S.make_composite(1024, 1024, 5, S.REALISTIC)
    sample = dict(image=comp.image, alpha=comp.alpha, fg=comp.foreground,
                  trimap=np.where(comp.alpha <= 0, 0, np.where(comp.alpha >= 1, 255, 128)).astype(np.uint8))
    out = {}
    for name in methods:
        fn = METHODS[name]
        n = 1 if name == "cf_ml" else repeats
        times = []
        for _ in range(n + 1):
            t = time.perf_counter()
            fn(sample)
            times.append(time.perf_counter() - t)
        out[name] = min(times[1:]) / (comp.alpha.size / 1e6)
    return out


def table(title: str, res: dict) -> str:
    scale = {"sad": 1, "mse": 1e3, "grad": 1, "conn": 1, "fg": 1e3, "fg_edge": 1e3}
    lines = [f"### {title}", "", "| method | SAD | MSE x1e3 | Grad | Conn | FG err x1e3 | FG edge x1e3 | "
             "s/MP at bench size (1 core) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k] * scale[k]:.3f}" for k in METRICS)
                     + f" | {r['s_per_mp']:.3f} |")
    peers = [n for n in res if n != "greenpost"]
    if "greenpost" in res and peers:
        ratios = []
        for k in (*METRICS, "s_per_mp"):
            best = min(peers, key=lambda n: res[n][k])
            ratios.append(f"{k} {res['greenpost'][k] / max(res[best][k], 1e-12):.2f} (vs {best})")
        lines += ["", "GreenPost / best peer: " + ", ".join(ratios)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=400, help="long side in pixels the photos are scaled to")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N photos (quick runs)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--sets", default="realistic,flat", help="comma-separated subset of realistic,flat")
    ap.add_argument("--no-tune", action="store_true", help="skip the ffmpeg parameter search (use the defaults)")
    ap.add_argument("--speed-methods", default="greenpost,vlahos_max,vlahos_avg,ffmpeg",
                    help="methods timed on a 1-megapixel image (cf_ml takes minutes there; add it if wanted)")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    if not (DATA / "input").is_dir():
        print(f"keying benchmark skipped: shared data not found at {DATA}")
        return 0
    if "ffmpeg" in methods and shutil.which("ffmpeg") is None:
        print("ffmpeg not found on PATH: the ffmpeg peer is left out")
        methods.remove("ffmpeg")
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    sets = build(args.size, args.limit)
    if "ffmpeg" in methods and not args.no_tune:
        tune_ffmpeg(sets["realistic"])
    print(f"{len(sets['realistic'])} images, long side {args.size}px; ffmpeg chromakey {FFMPEG_PARAMS}")
    for sname in args.sets.split(","):
        res = evaluate(sets[sname], methods)
        print()
        print(table(f"{sname} green screen", res))
    speed = speed_1mp([m for m in args.speed_methods.split(",") if m in methods])
    print("\n### speed at 1 megapixel (1024 x 1024, one core)\n")
    print("| method | s/MP |\n|---|---|")
    for name, v in speed.items():
        print(f"| {name} | {v:.3f} |")
    if "greenpost" in speed:
        ok = "meets" if speed["greenpost"] <= 0.2 else "misses"
        print(f"\nGreenPost {speed['greenpost']:.3f} s/MP {ok} the 0.2 s/MP target")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
