"""GreenPost's learned refinement: a small per-pixel network that corrects the classical alpha where it is
uncertain.

It reads, at each pixel of the uncertainty band, a 5 x 5 neighbourhood of the image's difference from the
backing plate (I - B), the foreground prior's (F0 - B), the classical alpha and its separation scale, a
3 x 3 neighbourhood of the same at 4x coarser scale (context), and the measured noise level; an MLP
predicts a correction of the classical alpha. The foreground is then unmixed again with the refined alpha
(models/greenpost.py).

The band is where the classical alpha is strictly between 0 and 1, dilated by `band_radius` pixels. Outside
it nothing changes; inside it the pixels are gathered and run in chunks, so time and memory scale with the
band, not the image.

Files: safetensors with `kind`, `format_version` and the architecture `config` (JSON) in the metadata.
Pickles, other kinds of file, newer formats and tensors that do not fit the config are refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

KIND = "diffumatting_greenpost_refiner"
FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED = WEIGHTS_DIR / "greenpost_refiner.safetensors"
CHUNK = 65536  # band pixels per forward pass (bounds the memory at any image size)

FINE_CH = 7     # I-B (3), F0-B (3), classical alpha (per neighbourhood pixel)
COARSE_CH = 4   # pooled I-B (3), pooled classical alpha
COARSE_F = 4    # pooling factor of the context level


@dataclass(frozen=True)
class RefinerConfig:
    """Architecture of a refiner; stored in its file's metadata."""

    radius: int = 1            # fine neighbourhood is (2r+1)^2 pixels
    ctx_radius: int = 1        # coarse neighbourhood is (2c+1)^2 cells
    hidden: tuple[int, ...] = (48, 24)
    band_radius: int = 1       # dilation of the uncertain pixels

    def __post_init__(self):
        for name in ("radius", "ctx_radius", "band_radius"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= 8:
                raise ValueError(f"refiner config {name}={v!r}: expected an integer in 0..8")
        hid = tuple(self.hidden)
        if not hid or not all(isinstance(h, int) and 1 <= h <= 1024 for h in hid):
            raise ValueError(f"refiner config hidden={self.hidden!r}: expected 1+ layer widths in 1..1024")
        object.__setattr__(self, "hidden", hid)

    @property
    def n_inputs(self) -> int:
        return FINE_CH * (2 * self.radius + 1) ** 2 + 1 + COARSE_CH * (2 * self.ctx_radius + 1) ** 2 + 3

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RefinerConfig":
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            unknown = set(d) - {f for f in cls.__dataclass_fields__}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            if "hidden" in d:
                d["hidden"] = tuple(d["hidden"])
            return cls(**d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"refiner config {text!r} is unreadable ({e}); the file is damaged or from another "
                             f"tool") from e


class Refiner(nn.Module):
    """MLP from a band pixel's features to a correction of its classical alpha."""

    def __init__(self, config: RefinerConfig | None = None):
        super().__init__()
        self.config = config or RefinerConfig()
        layers: list[nn.Module] = []
        n = self.config.n_inputs
        for h in self.config.hidden:
            layers += [nn.Linear(n, h), nn.ReLU()]
            n = h
        layers.append(nn.Linear(n, 1))
        self.mlp = nn.Sequential(*layers)
        # input normalisation (set from training data, saved with the weights)
        self.register_buffer("in_mean", torch.zeros(self.config.n_inputs))
        self.register_buffer("in_std", torch.ones(self.config.n_inputs))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (N, n_inputs) -> refined alpha (N,) in [0, 1]: the classical alpha (column `alpha_col`) plus
        the predicted correction."""
        a0 = feats[:, alpha_column(self.config)]
        z = (feats - self.in_mean) / self.in_std
        return (a0 + self.mlp(z)[:, 0]).clamp(0, 1)


def alpha_column(config: RefinerConfig) -> int:
    """Index of the centre pixel's classical alpha in the feature vector."""
    k = (2 * config.radius + 1) ** 2
    return (k // 2) * FINE_CH + FINE_CH - 1


# ----------------------------------------------------------------------------------------------- features

def band_mask(alpha: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels to refine: classical alpha strictly inside (0, 1), dilated by `radius`. alpha (1, 1, H, W)."""
    unsure = ((alpha > 0) & (alpha < 1)).float()
    if radius > 0:
        unsure = F.max_pool2d(unsure, 2 * radius + 1, stride=1, padding=radius)
    return unsure > 0


def _gather_rows(packed: torch.Tensor, W: int, H: int, ys: torch.Tensor, xs: torch.Tensor, r: int,
                 y0: int = 0) -> torch.Tensor:
    """packed: (h * W, C) channels-last rows y0..y0+h-1 of an H x W map. Returns the (2r+1)^2 neighbourhood
    of each point (clamped at the image border) as (N, (2r+1)^2 * C), offset-major."""
    h = packed.shape[0] // W
    cols = []
    for dy in range(-r, r + 1):
        yy = ((ys + dy).clamp(0, H - 1) - y0).clamp(0, h - 1) * W
        for dx in range(-r, r + 1):
            cols.append(packed.index_select(0, yy + (xs + dx).clamp(0, W - 1)))
    return torch.cat(cols, 1)


def _pack(maps: list[torch.Tensor], y0: int, y1: int) -> torch.Tensor:
    """Rows y0..y1-1 of (1, C_i, H, W) maps as one channels-last ((y1 - y0) * W, sum C_i) tensor."""
    t = torch.cat([m[0, :, y0:y1] for m in maps], 0)
    return t.permute(1, 2, 0).reshape(-1, t.shape[0])


@dataclass
class FeatureSource:
    """What the features are read from: the image and the classical fields (models/greenpost.KeyFields)."""

    image: torch.Tensor       # (1, 3, H, W)
    backing: torch.Tensor     # (1, 3, H, W)
    prior_fg: torch.Tensor    # (1, 3, H, W)
    alpha: torch.Tensor       # (1, 1, H, W) classical
    sig1_low: torch.Tensor    # (1, 1, h, w)
    noise_std: torch.Tensor   # (3,)
    coarse: torch.Tensor = field(init=False)

    def __post_init__(self):
        pooled = [F.avg_pool2d(t, COARSE_F, stride=COARSE_F, ceil_mode=True)
                  for t in (self.image, self.backing, self.alpha)]
        self.coarse = torch.cat([pooled[0] - pooled[1], pooled[2]], 1)


def features(src: FeatureSource, ys: torch.Tensor, xs: torch.Tensor, config: RefinerConfig) -> torch.Tensor:
    """Feature vectors (N, config.n_inputs) at the pixels (ys, xs): the fine neighbourhood (offset-major:
    I-B, F0-B, alpha), the separation scale, the coarse neighbourhood and log10 of the noise deviations."""
    H, W = src.alpha.shape[-2:]
    n = ys.numel()
    r = config.radius
    y0, y1 = max(0, int(ys.min()) - r), min(H, int(ys.max()) + r + 1)
    rows = slice(y0, y1)
    b = src.backing[:, :, rows]
    fine = _pack([src.image[:, :, rows] - b, src.prior_fg[:, :, rows] - b, src.alpha[:, :, rows]], 0, y1 - y0)
    g = _gather_rows(fine, W, H, ys, xs, r, y0)
    gy = (ys.float() + 0.5) / H * 2 - 1
    gx = (xs.float() + 0.5) / W * 2 - 1
    grid = torch.stack([gx, gy], -1).view(1, 1, n, 2)
    sig = F.grid_sample(src.sig1_low, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ch, cw = src.coarse.shape[-2:]
    ctx = _gather_rows(_pack([src.coarse], 0, ch), cw, ch, torch.div(ys, COARSE_F, rounding_mode="floor"),
                       torch.div(xs, COARSE_F, rounding_mode="floor"), config.ctx_radius)
    noise = torch.log10(src.noise_std.clamp_min(1e-4)).view(1, 3).expand(n, 3)
    return torch.cat([g, sig.view(n, 1).clamp(0, 1), ctx, noise], 1)


def refine_alpha(model: Refiner, src: FeatureSource) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined alpha (1, 1, H, W) and the band (1, 1, H, W) bool it was changed in; elsewhere the classical
    alpha is returned bit for bit."""
    band = band_mask(src.alpha, model.config.band_radius)
    out = src.alpha.clone()
    idx = band.view(-1).nonzero().view(-1)
    if idx.numel() == 0:
        return out, band
    W = src.alpha.shape[-1]
    flat = out.view(-1)
    with torch.no_grad():
        for s in range(0, idx.numel(), CHUNK):
            i = idx[s:s + CHUNK]
            flat[i] = model(features(src, torch.div(i, W, rounding_mode="floor"), i % W, model.config))
    return out, band


# ----------------------------------------------------------------------------------------------- files

def save_refiner(path, model: Refiner, extra_meta: dict | None = None) -> Path:
    """Write the refiner as safetensors with its config and format version in the metadata; atomic."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"refiner files are saved as .safetensors, got {path.name!r}; rename it to "
                         f"{path.stem}.safetensors")
    meta = {str(k): str(v) for k, v in (extra_meta or {}).items()}
    reserved = {"kind", "format_version", "config", "parameters"} & set(meta)
    if reserved:
        raise ValueError(f"extra_meta may not set the reserved keys {sorted(reserved)}")
    meta.update(kind=KIND, format_version=str(FORMAT_VERSION), config=model.config.to_json(),
                parameters=str(model.num_parameters()))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_refiner(path=SHIPPED) -> Refiner:
    """Rebuild a refiner from its safetensors file alone (eval mode, CPU, fp32). Refuses pickles, damaged
    files, files that are not GreenPost refiners, newer formats and tensors that do not fit the config."""
    from safetensors.torch import load_file

    from .matting_head import PICKLE_SUFFIXES, _read_safetensors_header

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path.name}: pickle files ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded and "
                         f"are refused; GreenPost refiners load from .safetensors only")
    if not path.is_file():
        raise ValueError(f"GreenPost refiner file {os.fspath(path)!r} does not exist; reinstall the pack (the "
                         f"shipped weights are models/weights/greenpost_refiner.safetensors) or use refiner 'off'")
    header = _read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("kind") != KIND:
        raise ValueError(f"{path.name} is not a GreenPost refiner (its metadata kind is {meta.get('kind')!r}, "
                         f"expected {KIND!r}); train one with train_refiner.py")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{path.name}: format_version {meta.get('format_version')!r} is not a number") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path.name} has refiner format version {version}; this pack reads up to "
                         f"{FORMAT_VERSION}: update comfyui-diffumatting")
    config = RefinerConfig.from_json(meta.get("config", ""))
    model = Refiner(config)
    tensors = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}"
                   for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"{path.name}: its tensors do not fit its config ({config.to_json()}): missing {missing}, "
                         f"unexpected {unexpected}, wrong shape {wrong}; the file is damaged or was edited")
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path.name}: tensors {bad} hold NaN or infinite values; retrain or restore the file")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval()


def weights_hash(model: Refiner) -> str:
    """SHA-256 over the state dict (names, shapes and bytes), for determinism checks."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().float().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


__all__ = ["Refiner", "RefinerConfig", "FeatureSource", "features", "refine_alpha", "band_mask",
           "save_refiner", "load_refiner", "weights_hash", "SHIPPED", "KIND", "FORMAT_VERSION"]
