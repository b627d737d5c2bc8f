"""Train GreenPost's learned refiner (models/refiner.py) on composites the project generates itself.

    python train_refiner.py [--out models/weights/greenpost_refiner.safetensors] [--seed 0] ...

1. A pool of seeded procedural composites (object over a varied green backing, exact alpha) is keyed
   classically (models/greenpost.key_fields, refiner off); the band pixels the refiner would see are
   sampled with their features and true alpha.
2. The refiner's MLP is trained with AdamW on L1 alpha error over that pool, batches drawn by a generator
   seeded from (seed, step), so the same seed gives the same weights and a resumed run continues exactly.
3. The weights are written atomically as self-describing safetensors; a resume checkpoint (model, optimiser,
   step) is written every --save-every steps beside them.

Never trains on ../shared data: the only data source is the project's own generators.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import _package  # this script's folder is on sys.path (Python puts it there), see _package.py

_package.register()
HERE = _package.ROOT

DATA_SOURCES = ("synthetic", "procedural")
CLEAN_FRACTION = 0.3  # procedural samples without camera effects (generated images are noise-free)
FLAT_FRACTION = 0.5   # of those, shot again over one flat key colour (a generated canvas), some lightly noisy


def build_parser() -> argparse.ArgumentParser:
    from diffumatting.models.cli_args import int_list, number

    def whole(flag, lo, hi):
        return number(flag, lo, hi, kind=int)

    p = argparse.ArgumentParser(prog="train_refiner.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "models" / "weights" / "greenpost_refiner.safetensors",
                   help="where to write the trained weights (.safetensors)")
    p.add_argument("--seed", type=whole("--seed", 0, 2 ** 31 - 1), default=0,
                   help="seed of the data pool, the initial weights and batches")
    p.add_argument("--data", choices=DATA_SOURCES, default=DATA_SOURCES[-1],
                   help="composite generator: 'procedural' = training/refiner_data.py (hair, fur, wires, meshes, "
                        "foliage, glass, smoke, motion blur, text, key-hued objects over photographic backings); "
                        "'synthetic' = models/synthetic.py objects over randomly varied green backings")
    p.add_argument("--images", type=whole("--images", 1, 100000), default=3000, help="composites in the training pool")
    p.add_argument("--val-images", type=whole("--val-images", 0, 10000), default=40,
                   help="held-out composites (other seeds) for the report")
    p.add_argument("--size-min", type=whole("--size-min", 32, 4096), default=256,
                   help="smallest composite side in pixels")
    p.add_argument("--size-max", type=whole("--size-max", 32, 4096), default=1024,
                   help="largest composite side in pixels (photos are keyed at 800 px and more: the context "
                        "levels must see that scale)")
    p.add_argument("--pixels-per-image", type=whole("--pixels-per-image", 1, 1_000_000), default=800,
                   help="band pixels sampled from each composite")
    p.add_argument("--steps", type=whole("--steps", 1, 10_000_000), default=25000, help="optimiser steps")
    p.add_argument("--batch", type=whole("--batch", 1, 1_000_000), default=2048, help="pixels per step")
    p.add_argument("--lr", type=number("--lr", 0, 1, lo_open=True, example=3e-3), default=3e-3,
                   help="peak learning rate (cosine decay to 5%% of it)")
    p.add_argument("--weight-decay", type=number("--weight-decay", 0, 1), default=1e-4, help="AdamW weight decay")
    p.add_argument("--hidden", type=int_list("--hidden", "64,32"), default=(64, 32),
                   help="MLP hidden layer widths, comma-separated")
    p.add_argument("--radius", type=whole("--radius", 0, 8), default=1,
                   help="fine neighbourhood radius in pixels (0..8)")
    p.add_argument("--context", type=int_list("--context", "4,16"), default=(4, 16),
                   help="pooling factors of the context levels, comma-separated (each 2, 4, 8, 16, 32 or 64)")
    p.add_argument("--threads", type=whole("--threads", 1, 256), default=1,
                   help="CPU threads for torch's training steps (fixed for reproducibility; one is fastest for "
                        "this small network)")
    p.add_argument("--workers", type=whole("--workers", 1, 64), default=2,
                   help="processes that make and key the composites (one thread each; the pool is the same for "
                        "any number)")
    p.add_argument("--save-every", type=whole("--save-every", 1, 10_000_000), default=2000,
                   help="write a resume checkpoint every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT's resume checkpoint (<out>.resume.safetensors) if it exists")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def parse_args(argv):
    p = build_parser()
    a = p.parse_args(argv)
    if a.out.suffix.lower() != ".safetensors":
        p.error(f"--out {a.out}: the weights are written as .safetensors; give a path ending in .safetensors")
    if a.out.exists() and a.out.is_dir():
        p.error(f"--out {a.out} is a folder; give a file path ending in .safetensors")
    if a.size_min > a.size_max:
        p.error(f"--size-min {a.size_min} is above --size-max {a.size_max}; swap them")
    from diffumatting.models.refiner import RefinerConfig

    try:
        a.config = RefinerConfig(radius=a.radius, hidden=a.hidden, context=a.context)
    except ValueError as e:
        p.error(str(e))
    return a


# ----------------------------------------------------------------------------------------------- data

def composite(source: str, seed: int, size_min: int, size_max: int):
    """One seeded composite: (image HxWx3, alpha HxW) float32 numpy, or None for a sample that is left out."""
    import numpy as np

    if source == "procedural":
        from diffumatting.training.refiner_data import make_sample

        rng = np.random.default_rng([seed, 19])
        size = int(rng.integers(size_min, size_max + 1))
        camera = bool(rng.random() >= CLEAN_FRACTION)
        flat = bool(rng.random() < FLAT_FRACTION)
        d = make_sample(seed, size, camera_effects=camera and not flat)
        if flat:
            a = d["alpha"][..., None]
            key = np.median(d["backing"].reshape(-1, 3), 0)
            image = a * d["fg"] + (1 - a) * key
            if rng.random() < 0.5:
                image = np.round(np.clip(image + rng.normal(0, rng.uniform(0.002, 0.01), image.shape), 0, 1) * 255) / 255
            return np.clip(image, 0, 1).astype(np.float32), d["alpha"]
        return d["image"], d["alpha"]  # green and blue backings: GreenPost detects either

    from diffumatting.models import synthetic

    rng = np.random.default_rng([seed, 17])
    h = int(rng.integers(size_min, size_max + 1))
    w = int(rng.integers(size_min, size_max + 1))
    real = synthetic.Realism(falloff=float(rng.uniform(0, 0.5)), shadow=float(rng.uniform(0, 0.5)),
                             spill=float(rng.uniform(0, 0.4)),
                             noise=float(rng.choice([0.0, rng.uniform(0.002, 0.03)])),
                             blur=float(rng.uniform(0, 1.0)),
                             jpeg_quality=int(rng.choice([0, rng.integers(70, 97)])))
    fg, alpha = synthetic.random_object(h, w, seed, greenish=bool(rng.random() < 0.2),
                                        hair=bool(rng.random() < 0.8), translucent=bool(rng.random() < 0.5))
    backing = synthetic.green_backing(h, w, seed, real)
    return synthetic.composite(fg, alpha, backing, seed, real), alpha


def sample_pixels(image, alpha_gt, config, n: int, seed: int):
    """Key one composite classically; return (features (m, n_inputs), true alpha (m,), classical alpha (m,))
    at up to n band pixels chosen with a generator seeded by `seed`."""
    import torch

    from diffumatting.models.greenpost import GreenPostOptions, key_fields
    from diffumatting.models.refiner import FeatureSource, alpha_column, band_mask, features

    x = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    kf = key_fields(x, None, GreenPostOptions(refiner="off"))
    src = FeatureSource(image=x[None], backing=kf.backing, prior_fg=kf.prior_fg, alpha=kf.classical_alpha,
                        sig1_low=kf.sig1_low, noise_std=kf.noise_std)
    idx = band_mask(src.alpha).view(-1).nonzero().view(-1)
    if idx.numel() == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    if idx.numel() > n:
        idx = idx[torch.randperm(idx.numel(), generator=g)[:n]].sort().values
    W = x.shape[-1]
    f = features(src, torch.div(idx, W, rounding_mode="floor"), idx % W, config)
    y = torch.from_numpy(alpha_gt).reshape(-1)[idx]
    return f, y, f[:, alpha_column(config)].clone()


def _pool_item(job):
    """The sampled pixels of one composite (a worker's unit: a pure function of the job), or None."""
    source, seed, size_min, size_max, config, n = job
    comp = composite(source, seed, size_min, size_max)
    return None if comp is None else sample_pixels(comp[0], comp[1], config, n, seed)


def _worker_init() -> None:
    import torch

    _package.register()
    torch.set_num_threads(1)  # one thread per worker: the same arithmetic as a single-process run


def build_pool(args, seeds, n_per_image):
    """Features, true alpha and classical alpha of the sampled band pixels of every composite, in seed order.
    With --workers > 1 the composites are made and keyed by that many processes (one thread each); every
    composite is a pure function of its seed, so the pool is the same for any number of workers."""
    import torch

    jobs = [(args.data, s, args.size_min, args.size_max, args.config, n_per_image) for s in seeds]
    if args.workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as ex:
            got = list(ex.map(_pool_item, jobs, chunksize=4))
    else:
        got = [_pool_item(j) for j in jobs]
    got = [g for g in got if g is not None]
    if not got:
        return None
    return tuple(torch.cat([g[i] for g in got]) for i in range(3))


# ----------------------------------------------------------------------------------------------- training

def _resume_path(out: Path) -> Path:
    return out.with_name(out.stem + ".resume.safetensors")


def _save_resume(path: Path, model, opt, step: int, args) -> None:
    from safetensors.torch import save_file

    from diffumatting.models.atomic import atomic_path

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"opt.{i}.{k}"] = st[k].contiguous()
    meta = {"step": str(step), "args": _args_fingerprint(args)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def data_version(source: str) -> str:
    """Version of the composites a run trains on: the generator's module and its DATA_VERSION."""
    if source == "procedural":
        from diffumatting.training.refiner_data import DATA_VERSION

        return f"training/refiner_data.py v{DATA_VERSION}"
    return "models/synthetic.py (unversioned)"


def _args_fingerprint(args) -> str:
    """The training configuration (every setting that changes the weights), as JSON."""
    keys = ("seed", "data", "images", "val_images", "size_min", "size_max", "pixels_per_image", "steps", "batch",
            "lr", "weight_decay", "hidden", "radius", "context", "threads")
    d = {k: getattr(args, k) for k in keys}
    d["data_version"] = data_version(args.data)
    d["clean_fraction"] = CLEAN_FRACTION
    d["flat_fraction"] = FLAT_FRACTION
    return json.dumps(d, sort_keys=True, default=str)


def _load_resume(path: Path, model, opt, args) -> int:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("args") != _args_fingerprint(args):
            raise SystemExit(f"error: {path} was written by a run with other settings ({meta.get('args')}); "
                             f"rerun with those settings or delete it to start over")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(model.parameters()):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(float(meta["step"])), "exp_avg": tensors[f"opt.{i}.exp_avg"],
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"]}
    return int(meta["step"])


def lr_at(step: int, args) -> float:
    import math

    warm = max(1, min(500, args.steps // 20))
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train(args) -> dict:
    import torch

    from diffumatting.models.refiner import Refiner, save_refiner, weights_hash

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train_seeds = [args.seed * 1_000_003 + i for i in range(args.images)]
    val_seeds = [args.seed * 1_000_003 + 500_000 + i for i in range(args.val_images)]
    pool = build_pool(args, train_seeds, args.pixels_per_image)
    if pool is None:
        raise SystemExit(f"error: none of the {args.images} training composites had an uncertain band; raise "
                         f"--images")
    X, Y, A0 = pool
    t_data = time.perf_counter() - t0
    if not args.quiet:
        print(f"pool: {X.shape[0]} band pixels from {args.images} composites in {t_data:.0f} s", flush=True)
    model = Refiner(args.config)
    model.in_mean.copy_(X.mean(0))
    model.in_std.copy_(X.std(0).clamp_min(1e-3))
    opt = torch.optim.AdamW(model.mlp.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    resume = _resume_path(args.out)
    step = 0
    if args.resume and resume.is_file():
        step = _load_resume(resume, model, opt, args)
        if not args.quiet:
            print(f"resumed at step {step} from {resume}", flush=True)
    model.train()
    run = 0.0
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        g = torch.Generator().manual_seed(args.seed * 7_919 + step)
        idx = torch.randint(0, X.shape[0], (args.batch,), generator=g)
        loss = (model(X[idx]) - Y[idx]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        lv = float(loss.detach())
        run = 0.98 * run + 0.02 * lv if step > 1 else lv
        if not args.quiet and (step % 1000 == 0 or step == args.steps):
            print(f"step {step}/{args.steps} loss {run:.4f} lr {lr_at(step - 1, args):.2e} "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        if step % args.save_every == 0 and step < args.steps:
            _save_resume(resume, model, opt, step, args)
    model.eval()
    report = {"seed": args.seed, "steps": args.steps, "pool_pixels": int(X.shape[0]),
              "parameters": model.num_parameters(), "train_l1_classical": float((A0 - Y).abs().mean())}
    with torch.no_grad():
        report["train_l1_refined"] = float((model(X) - Y).abs().mean())
        val = build_pool(args, val_seeds, 10 ** 9) if val_seeds else None
        if val is not None:
            Xv, Yv, Av = val
            report["val_l1_classical"] = float((Av - Yv).abs().mean())
            report["val_l1_refined"] = float((model(Xv) - Yv).abs().mean())
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["weights_sha256"] = weights_hash(model)
    save_refiner(args.out, model, extra_meta={"trained_on": f"{args.data} composites (project generator)",
                                              "data_version": data_version(args.data),
                                              "train_args": _args_fingerprint(args),
                                              "report": json.dumps(report, sort_keys=True)})
    resume.unlink(missing_ok=True)
    return report


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = train(args)
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
