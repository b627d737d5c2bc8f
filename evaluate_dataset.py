#!/usr/bin/env python
"""Downstream check of a matting dataset: train a small trimap-based matting network on each dataset
folder (make_dataset.py's output: the accepted samples' fg.png + alpha.png, composited over backgrounds),
then score it on real mattes with the matting metrics (SAD, MSE over the unknown band, gradient,
connectivity; tests/support/metrics.py, the definitions the keying benchmark reports).

  python evaluate_dataset.py --data ds_a --data ds_b --real alphamatting/ --steps 4000 --out eval.json

--real holds input/<name>.png (the photos), gt/<name>.png (true alpha) and optionally trimap1/<name>.png
(else a trimap is made from the true alpha). With several --data folders, every model is trained with the
same seed, steps and backgrounds, and the table gives each one's MSE relative to the first (the paper
reports 15.4% lower relative MSE for general objects when its synthetic data is added). The last line
printed is the JSON results file. This is an evaluation tool: it runs from a checkout of the repository
(it reads the metrics from tests/support/).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import _package  # this script's folder is on sys.path (Python puts it there), see _package.py

_package.register()
ROOT = _package.ROOT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate_dataset.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="a make_dataset.py output folder (repeat to compare datasets; the first is the reference)")
    p.add_argument("--real", type=Path, required=True, help="real mattes: input/, gt/ and optional trimap1/")
    p.add_argument("--backgrounds", type=Path, help="background images for the training composites (default: "
                   "generated colour fields)")
    p.add_argument("--steps", type=int, default=2000, help="training steps per dataset (default 2000)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--crop", type=int, default=128, help="training crop size in pixels, multiple of 4 (default 128)")
    p.add_argument("--width", type=int, default=16, help="network width (channels at full resolution, default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--eval-size", type=int, default=320, help="real images are scaled so their longer side is "
                   "this (default 320; 0 = full size)")
    p.add_argument("--trimap-band", type=int, default=8, help="band for trimaps made from true alphas (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, crops and backgrounds (default 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--out", type=Path, help="results JSON (default: evaluation.json in the first --data folder)")
    return p


def validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for d in a.data:
        if not (d / "manifest.jsonl").is_file():
            p.error(f"--data {d} has no manifest.jsonl; give a folder written by make_dataset.py")
    for sub in ("input", "gt"):
        if not (a.real / sub).is_dir():
            p.error(f"--real {a.real} has no {sub}/ folder; expected input/<name>.png and gt/<name>.png")
    for name, lo in (("steps", 1), ("batch", 1), ("crop", 8), ("width", 4), ("trimap_band", 0), ("eval_size", 0)):
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: expected {lo} or more")
    if a.crop % 4:
        p.error(f"--crop {a.crop}: expected a multiple of 4")
    if not a.lr > 0:
        p.error(f"--lr {a.lr}: expected a positive number")
    if a.backgrounds is not None and not a.backgrounds.is_dir():
        p.error(f"--backgrounds {a.backgrounds} is not a folder")


def load_dataset(folder: Path, band: int):
    """The accepted samples' (fg, alpha, trimap input) arrays."""
    from diffumatting.models.dataset_images import read_png_float
    from diffumatting.models.dataset_quality import trimap
    from diffumatting.models.matting_student import trimap_input

    out = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["status"] != "accepted" or "fg.png" not in rec["files"]:
            continue
        fg = read_png_float((folder / rec["files"]["fg.png"]).read_bytes(), rec["files"]["fg.png"])
        alpha = read_png_float((folder / rec["files"]["alpha.png"]).read_bytes(), rec["files"]["alpha.png"])
        out.append((fg, alpha, trimap_input(trimap(alpha, band))))
    if not out:
        raise SystemExit(f"evaluate_dataset: {folder} has no accepted dataset samples (fg.png + alpha.png); "
                         f"make more samples or relax the filters")
    return out


def load_real(folder: Path, size: int, band: int):
    """(name, rgb, trimap input, true alpha) per real image, scaled so the longer side is `size`."""
    import cv2

    from diffumatting.models.dataset_images import read_image_file
    from diffumatting.models.dataset_quality import trimap
    from diffumatting.models.matting_student import trimap_input

    items = []
    for path in sorted((folder / "input").glob("*.png")):
        gt_path = folder / "gt" / path.name
        if not gt_path.is_file():
            raise SystemExit(f"evaluate_dataset: {path} has no true alpha {gt_path}")
        rgb = read_image_file(path)
        gt = read_image_file(gt_path)[..., 0]
        tri_path = folder / "trimap1" / path.name
        tri = read_image_file(tri_path)[..., 0] if tri_path.is_file() else trimap(gt, band) / 255.0
        if size and max(gt.shape) > size:
            s = size / max(gt.shape)
            wh = (max(4, round(gt.shape[1] * s)), max(4, round(gt.shape[0] * s)))
            rgb = cv2.resize(rgb, wh, interpolation=cv2.INTER_AREA)
            gt = cv2.resize(gt, wh, interpolation=cv2.INTER_AREA)
            tri = cv2.resize(tri, wh, interpolation=cv2.INTER_NEAREST)
        items.append((path.stem, rgb, trimap_input((tri * 255).round().astype("uint8")), gt))
    if not items:
        raise SystemExit(f"evaluate_dataset: {folder / 'input'} holds no .png image")
    return items


def train(samples, backgrounds, a) -> "object":
    import numpy as np
    import torch

    from diffumatting.models.matting_student import StudentNet, loss, training_batch

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    net = StudentNet(a.width).to(a.device)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    for step in range(a.steps):
        rgb, tri, alpha = (t.to(a.device) for t in training_batch(samples, backgrounds, rng, a.batch, a.crop))
        value = loss(net(rgb, tri), alpha, tri)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if step % max(1, a.steps // 10) == 0 or step == a.steps - 1:
            print(f"[eval]   step {step + 1}/{a.steps} loss {value.item():.4f}", file=sys.stderr, flush=True)
    return net.eval()


def score(net, real, device: str) -> dict:
    from diffumatting.models.matting_student import predict
    from support.metrics import all_metrics

    per = {}
    for name, rgb, tri, gt in real:
        pred = predict(net, rgb, tri, device)
        per[name] = all_metrics(pred, gt, unknown=tri == 0.5)
    keys = next(iter(per.values())).keys()
    return {"mean": {k: statistics.fmean(v[k] for v in per.values()) for k in keys}, "per_image": per}


def main(argv: list[str]) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    validate(p, a)
    sys.path.insert(0, str(ROOT / "tests"))  # support/metrics.py
    from diffumatting.factory.run import load_backgrounds

    backgrounds = [img for _, img in load_backgrounds(a.backgrounds)] if a.backgrounds else []
    real = load_real(a.real, a.eval_size, a.trimap_band)
    results = {"real": str(a.real), "images": len(real), "settings": {k: getattr(a, k) for k in
               ("steps", "batch", "crop", "width", "lr", "eval_size", "seed")}, "datasets": []}
    for folder in a.data:
        samples = load_dataset(folder, a.trimap_band)
        print(f"[eval] {folder}: {len(samples)} samples, training {a.steps} steps", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        net = train(samples, backgrounds, a)
        res = score(net, real, a.device)
        results["datasets"].append({"data": str(folder), "samples": len(samples),
                                    "train_s": round(time.monotonic() - t0, 2), **res})
    ref = results["datasets"][0]["mean"]["mse"]
    print(f"{'dataset':40s} {'samples':>7s} {'SAD':>8s} {'MSE':>9s} {'Grad':>8s} {'Conn':>8s} {'rel MSE':>8s}")
    for d in results["datasets"]:
        m = d["mean"]
        d["relative_mse"] = m["mse"] / ref if ref > 0 else None
        rel = f"{d['relative_mse']:.3f}" if d["relative_mse"] is not None else "-"
        print(f"{Path(d['data']).name[:40]:40s} {d['samples']:7d} {m['sad']:8.2f} {m['mse']:9.5f} {m['grad']:8.2f} "
              f"{m['conn']:8.2f} {rel:>8s}")
    out = a.out or a.data[0] / "evaluation.json"
    from diffumatting.models.atomic import write_bytes_atomic

    write_bytes_atomic(out, (json.dumps(results, indent=1) + "\n").encode())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
