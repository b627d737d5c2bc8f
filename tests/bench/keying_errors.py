"""Where GreenPost's keying error goes: SAD split by ground-truth alpha and by classical alpha (a
diagnostic companion of tests/bench/keying.py, same data and samples; tune split by default).

For each backing generator and each method (GreenPost refined, GreenPost classical, the tuned vlahos_avg
peer) the summed |alpha - gt| / 1000 over the split is split into cells:
- by the classical GreenPost alpha: exactly 0, exactly 1, in between;
- by ground truth: 0, (0, 0.1], (0.1, 0.5], (0.5, 0.9], (0.9, 1), 1;
and the signed parts: too transparent (a < gt) and too opaque (a > gt). Printed as one table per
generator. Prints the median SAD per method too (the benchmark's figure).

    python tests/bench/keying_errors.py [--size 800] [--split tune] [--cache DIR]

--cache DIR keeps the built samples (pymatting foreground estimation is the slow part) as .npz files in
DIR, keyed by size and generator; nothing is cached without it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keying  # noqa: E402  the benchmark's data, methods and peers

GT_BINS = ((0.0, 0.0, "gt=0"), (0.0, 0.1, "(0,.1]"), (0.1, 0.5, "(.1,.5]"), (0.5, 0.9, "(.5,.9]"),
           (0.9, 1.0, "(.9,1)"), (1.0, 1.0, "gt=1"))
KEYS = ("image", "alpha", "fg", "trimap", "unknown", "known_bg")


def _gt_bin(gt: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if lo == hi:
        return gt == lo
    if hi == 1.0:
        return (gt > lo) & (gt < hi)
    return (gt > lo) & (gt <= hi)


def load_sets(size: int, gens, cache: Path | None) -> dict[str, list[dict]]:
    """The benchmark's samples per generator, built (or read from the --cache folder)."""
    out, todo = {}, []
    for g in gens:
        path = None if cache is None else cache / f"keying_{g}_{size}.npz"
        if path is not None and path.is_file():
            z = np.load(path, allow_pickle=False)
            names = [str(n) for n in z["names"]]
            out[g] = [dict(name=n, split="tune" if n in keying.TUNE else "val",
                           **{k: z[f"{k}_{i}"] for k in KEYS}) for i, n in enumerate(names)]
        else:
            todo.append(g)
    if todo:
        built = keying.build(size, None, todo)
        for g in todo:
            out[g] = built[g]
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                arrays = {f"{k}_{i}": x[k] for i, x in enumerate(built[g]) for k in KEYS}
                np.savez(cache / f"keying_{g}_{size}.npz", names=np.array([x["name"] for x in built[g]]), **arrays)
    return out


def breakdown(samples, params) -> dict[str, dict]:
    """Per method: summed error / 1000 per (classical-alpha class, gt bin), signed parts, per-image SADs."""
    from support.metrics import sad

    methods = ("greenpost", "greenpost_classical", "vlahos_avg")
    res = {m: {"cells": {}, "under": 0.0, "over": 0.0, "sads": []} for m in methods}
    for x in samples:
        gt = x["alpha"]
        outs = {m: keying.METHODS[m](x, params.get(m))[0] for m in methods}
        a_cl = outs["greenpost_classical"]
        cls = {"cl=0": a_cl <= 0, "cl=1": a_cl >= 1, "cl mid": (a_cl > 0) & (a_cl < 1)}
        for m, a in outs.items():
            err = a - gt
            r = res[m]
            r["sads"].append(sad(a, gt))
            r["under"] += float(-err[err < 0].sum()) / 1000
            r["over"] += float(err[err > 0].sum()) / 1000
            for cname, cmask in cls.items():
                for lo, hi, bname in GT_BINS:
                    cell = cmask & _gt_bin(gt, lo, hi)
                    r["cells"][(cname, bname)] = r["cells"].get((cname, bname), 0.0) + float(np.abs(err[cell]).sum()) / 1000
    return res


def print_breakdown(g: str, split: str, res: dict) -> None:
    print(f"\n### {g}, {split} split: summed |a - gt| / 1000 over the split's images\n")
    for m, r in res.items():
        print(f"{m}: median SAD {np.median(r['sads']):.2f}, total {sum(r['sads']):.1f} "
              f"(too transparent {r['under']:.1f}, too opaque {r['over']:.1f})")
    cols = [b for _, _, b in GT_BINS]
    print("\n| method | classical | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for m, r in res.items():
        for cname in ("cl=0", "cl mid", "cl=1"):
            print(f"| {m} | {cname} | " + " | ".join(f"{r['cells'][(cname, b)]:.1f}" for b in cols) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=800, help="long side in pixels (default 800, the bench's full size)")
    ap.add_argument("--split", choices=("tune", "val", "all"), default="tune", help="which split to break down")
    ap.add_argument("--generators", default=",".join(keying.GENERATORS),
                    help="comma-separated subset of " + ",".join(keying.GENERATORS))
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep the built samples in (.npz)")
    args = ap.parse_args(argv)
    gens = [g for g in args.generators.split(",") if g]
    if [g for g in gens if g not in keying.GENERATORS] or not gens:
        ap.error(f"--generators {args.generators!r}: choose from {list(keying.GENERATORS)}")
    if args.size < 32:
        ap.error(f"--size {args.size}: expected at least 32 pixels")
    if not (keying.DATA / "input").is_dir():
        print(f"keying error breakdown skipped: shared data not found at {keying.DATA}")
        return 0
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sets = load_sets(args.size, gens, args.cache)
    for g in gens:
        samples = sets[g]
        params = keying.tune_peers([x for x in samples if x["split"] == "tune"], ["vlahos_avg"], False)
        chosen = [x for x in samples if args.split == "all" or x["split"] == args.split]
        print_breakdown(g, args.split, breakdown(chosen, params))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
