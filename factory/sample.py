"""One sample's files and scores, from the two PNGs the workflow saved on the server.

`key`: 16-bit RGBA, straight despilled foreground + GreenPost alpha. `green`: 16-bit RGBA, the green
original + the matting head's alpha (opaque when the workflow has no head).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..models import dataset_quality
from ..models.alpha import alpha_bbox
from ..models.asset_export import asset_png
from ..models.dataset_images import composite, read_png_float
from ..models.png import encode_png


@dataclass(frozen=True)
class SampleOptions:
    trimap_band: int = 8
    composites: int = 0
    composite_scale: tuple[float, float] = (0.5, 0.9)
    key_color: tuple[float, float, float] = dataset_quality.DEFAULT_KEY
    assets: bool = False          # artist mode: one trimmed RGBA PNG named after the prompt
    asset_bits: int = 8
    asset_padding: int = 8


@dataclass
class Sample:
    files: dict[str, bytes]                     # file name (inside the sample's place) -> bytes
    scores: dict
    size: tuple[int, int]
    extra: dict = field(default_factory=dict)
    thumb: tuple[np.ndarray, np.ndarray] | None = None


def _split(png: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = read_png_float(png, what)
    if x.ndim != 3 or x.shape[-1] != 4:
        raise ValueError(f"{what}: expected an RGBA PNG from Save Transparent PNG, got shape {x.shape}")
    return x[..., :3], x[..., 3]


def build_sample(job, pngs: dict[str, bytes], opts: SampleOptions, has_head: bool,
                 backgrounds: list | None = None) -> Sample:
    """Decode, annotate, score and encode one sample (runs in a worker thread)."""
    fg, alpha = _split(pngs["key"], f"sample {job.id} key output")
    green, head_alpha = _split(pngs["green"], f"sample {job.id} green output")
    if green.shape != fg.shape:
        raise ValueError(f"sample {job.id}: green original {green.shape} and keyed image {fg.shape} differ in size")
    scores = dataset_quality.score_sample(green, fg, alpha, head_alpha if has_head else None, opts.key_color)
    files: dict[str, bytes] = {}
    extra: dict = {}
    if opts.assets:
        # The same trim and encoding as the Save Transparent Batch node's (models/asset_export).
        rgba = np.concatenate([fg, alpha[..., None]], axis=-1)
        files["asset.png"], _ = asset_png(rgba, opts.asset_padding, opts.asset_bits)
        extra["trim_box"] = alpha_bbox(torch.from_numpy(alpha))
    else:
        files["fg.png"] = encode_png(fg, 16)
        files["alpha.png"] = encode_png(alpha, 16)
        files["trimap.png"] = encode_png(dataset_quality.trimap(alpha, opts.trimap_band) / 255.0, 8)
        files["green.png"] = encode_png(green, 8)
        if has_head:
            files["head_alpha.png"] = encode_png(head_alpha, 16)
        if opts.composites and backgrounds:
            rng = np.random.default_rng(int(job.seed) ^ 0x5EED)
            placements = []
            for k in range(opts.composites):
                bg_name, bg = backgrounds[int(rng.integers(len(backgrounds)))]
                comp, comp_a, where = composite(fg, alpha, bg, rng, opts.composite_scale)
                files[f"comp_{k:02d}.png"] = encode_png(comp, 8)
                files[f"comp_{k:02d}_alpha.png"] = encode_png(comp_a, 16)
                placements.append({"background": bg_name, **where})
            extra["composites"] = placements
    return Sample(files, scores, alpha.shape, extra, (fg, alpha))
