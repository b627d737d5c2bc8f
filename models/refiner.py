"""GreenPost's learned refinement: a small per-pixel network that corrects the classical alpha where it is
uncertain.

It reads, at each pixel of the uncertainty band, a (2 radius + 1)^2 neighbourhood of the image's difference
from the backing plate (I - B), the foreground prior's (F0 - B) and the classical alpha; the plate's colour
and the alpha's separation scale there; a 3 x 3 neighbourhood of block averages at coarser scales (context:
4x and 16x by default) of I - B, the classical alpha and the fractions of certainly opaque and certainly
transparent pixels (how far the certain regions are); and the measured noise level. An MLP predicts a
correction of the classical alpha (a residual). The foreground is then unmixed again with the refined alpha
(models/greenpost.py).

Safe by design: the band is where the classical alpha is more than half an 8-bit step (SURE) from 0 and 1.
Pixels the classical key marks certain (clean backing, solid interiors: 0 or 1, or so close that 8-bit
output writes 0 or 255) are never changed, so the refined matte keeps its 0 and 255 wherever the classical
key has them. Inside the band the pixels are gathered
and run in chunks, so time and memory scale with the band, not the image.

Files: safetensors with `kind`, `format_version` and the architecture `config` (JSON) in the metadata.
Pickles, other kinds of file, newer formats and tensors that do not fit the config are refused.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model_files import config_from_json

KIND = "diffumatting_greenpost_refiner"
FORMAT_VERSION = 2  # 2: band = the uncertain pixels only, plate colour and certain-region context features
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED = WEIGHTS_DIR / "greenpost_refiner.safetensors"
CHUNK = 65536  # band pixels per forward pass (bounds the memory at any image size)
SMOOTH = 1     # corrections are box-averaged over the band pixels of a (2 SMOOTH + 1)^2 box (tune split)
STRENGTH = 0.5  # fraction of the (smoothed) correction applied: the network's corrections are noisy on real
                # mattes; on the keying bench's tune split at 800 px (GT01-12) half of each beat a quarter on every
                # backing and metric, three quarters lowered SAD on the photographic and synthetic backings further
                # but raised SAD and FG colour on the flat one (generated images)

FINE_CH = 7     # I-B (3), F0-B (3), classical alpha (per neighbourhood pixel)
COARSE_CH = 6   # pooled I-B (3), classical alpha, fraction of alpha == 1, fraction of alpha == 0
CENTRE_CH = 5   # plate colour B (3), colour-difference alpha, separation scale (centre pixel only)
SURE = 0.5 / 255  # classical alpha within this of 0 or 1 is certain: never changed (8-bit 0 / 255 stay)


@dataclass(frozen=True)
class RefinerConfig:
    """Architecture of a refiner; stored in its file's metadata."""

    radius: int = 1            # fine neighbourhood is (2r+1)^2 pixels
    ctx_radius: int = 1        # coarse neighbourhood is (2c+1)^2 cells
    hidden: tuple[int, ...] = (64, 32)
    context: tuple[int, ...] = (4, 16)  # pooling factors of the context levels

    def __post_init__(self):
        for name in ("radius", "ctx_radius"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= 8:
                raise ValueError(f"refiner config {name}={v!r}: expected an integer in 0..8")
        hid = tuple(self.hidden)
        if not hid or not all(isinstance(h, int) and 1 <= h <= 1024 for h in hid):
            raise ValueError(f"refiner config hidden={self.hidden!r}: expected 1+ layer widths in 1..1024")
        object.__setattr__(self, "hidden", hid)
        ctx = tuple(self.context)
        if not all(isinstance(c, int) and c in (2, 4, 8, 16, 32, 64) for c in ctx) or len(set(ctx)) != len(ctx):
            raise ValueError(f"refiner config context={self.context!r}: expected distinct pooling factors from "
                             f"2, 4, 8, 16, 32, 64")
        object.__setattr__(self, "context", ctx)

    @property
    def n_inputs(self) -> int:
        return (FINE_CH * (2 * self.radius + 1) ** 2 + CENTRE_CH
                + len(self.context) * COARSE_CH * (2 * self.ctx_radius + 1) ** 2 + 3)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RefinerConfig":
        return config_from_json(cls, text, "GreenPost refiner")


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

    def halo(self) -> int:
        """Rows of margin a band of an image needs so that its inner rows refine as in the whole image: the
        widest context reach, a multiple of 16 (GreenPost's bands start on multiples of 16, so the context
        levels' pooling blocks stay aligned with the whole image's)."""
        reach = max([f * (self.config.ctx_radius + 1) for f in self.config.context]
                    + [self.config.radius + SMOOTH + 1])
        return max(32, -(-reach // 16) * 16)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (N, n_inputs) -> refined alpha (N,) in [0, 1]: the classical alpha (column `alpha_col`) plus
        the predicted correction."""
        a0 = feats[:, alpha_column(self.config)]
        if self.training:
            out = self.mlp((feats - self.in_mean) / self.in_std)
        else:  # the normalisation folded into the first layer: one pass less over the features
            first = self.mlp[0]
            w = first.weight / self.in_std
            out = self.mlp[1:](F.linear(feats, w, first.bias - w @ self.in_mean))
        return (a0 + out[:, 0]).clamp(0, 1)


def alpha_column(config: RefinerConfig) -> int:
    """Index of the centre pixel's classical alpha in the feature vector."""
    k = (2 * config.radius + 1) ** 2
    return (k // 2) * FINE_CH + FINE_CH - 1


# ----------------------------------------------------------------------------------------------- features

def band_mask(alpha: torch.Tensor) -> torch.Tensor:
    """Pixels to refine: classical alpha more than SURE from 0 and 1. alpha (1, 1, H, W) -> bool (1, 1, H, W)."""
    return (alpha > SURE) & (alpha < 1 - SURE)


def colour_difference_alpha(image: torch.Tensor, backing: torch.Tensor) -> torch.Tensor:
    """Colour-difference (Vlahos) alpha against the local plate: 1 - e(I) / e(B), e(x) the plate's dominant
    channel minus the larger of the other two. image, backing (N, 3) -> (N,), clamped to [-1, 2]."""
    p = backing.argmax(1, keepdim=True)
    sel = torch.ones_like(backing, dtype=torch.bool).scatter_(1, p, False)

    def excess(x):
        return x.gather(1, p)[:, 0] - x.masked_fill(~sel, -1.0).max(1).values
    return (1.0 - excess(image) / excess(backing).clamp_min(0.02)).clamp(-1.0, 2.0)


def _neighbourhoods(maps: list[torch.Tensor], ys: torch.Tensor, xs: torch.Tensor, r: int) -> torch.Tensor:
    """Values of the (1, C_i, H, W) maps on the (2r+1)^2 neighbourhood of each point (ys, xs), clamped at
    the image border. Returns (N, (2r+1)^2 * sum C_i), ordered dy, dx, channel.

    The rows the points need are packed channels-last with an r-pixel replicated border; a strided view
    makes each run of 2r+1 neighbouring pixels one row, so one row gather per dy reads a whole run."""
    H, W = maps[0].shape[-2:]
    y0, y1 = max(0, int(ys.min()) - r), min(H, int(ys.max()) + r + 1)
    t = torch.cat([m[:, :, y0:y1] for m in maps], 1)
    if r > 0:
        t = F.pad(t, (r, r, r, r), mode="replicate")
    C, Wp = t.shape[1], t.shape[-1]
    flat = t[0].permute(1, 2, 0).contiguous().view(-1, C)
    runs = flat.as_strided((flat.shape[0] - 2 * r, (2 * r + 1) * C), (C, 1))
    base = (ys - y0) * Wp + xs
    if r == 0:
        return runs.index_select(0, base)
    return torch.cat([runs.index_select(0, base + (r + dy) * Wp) for dy in range(-r, r + 1)], 1)


@dataclass
class FeatureSource:
    """What the features are read from: the image and the classical fields (models/greenpost.KeyFields)."""

    image: torch.Tensor       # (1, 3, H, W)
    backing: torch.Tensor     # (1, 3, H, W)
    prior_fg: torch.Tensor    # (1, 3, H, W)
    alpha: torch.Tensor       # (1, 1, H, W) classical
    sig1_low: torch.Tensor    # (1, 1, gh, gw) on the whole image's grid
    noise_std: torch.Tensor   # (3,)
    row0: int = 0             # the maps are rows row0.. of an image of image_size (a band of its rows)
    image_size: tuple[int, int] | None = None
    _coarse: dict = field(init=False, default_factory=dict)

    def coarse(self, f: int) -> torch.Tensor:
        """Block averages at factor f of (I - B, alpha, alpha == 1, alpha == 0), (1, 6, ceil(H/f), ceil(W/f));
        computed once per factor."""
        if f not in self._coarse:
            t = torch.cat([self.image - self.backing, self.alpha, (self.alpha >= 1).float(),
                           (self.alpha <= 0).float()], 1)
            self._coarse[f] = F.avg_pool2d(t, f, stride=f, ceil_mode=True)
        return self._coarse[f]


def features(src: FeatureSource, ys: torch.Tensor, xs: torch.Tensor, config: RefinerConfig) -> torch.Tensor:
    """Feature vectors (N, config.n_inputs) at the pixels (ys, xs): the fine neighbourhood (offset-major:
    I-B, F0-B, alpha), the plate colour, the colour-difference alpha and the separation scale at the pixel,
    the coarse neighbourhoods and log10 of the noise deviations."""
    H, W = src.alpha.shape[-2:]
    n = ys.numel()
    r = config.radius
    y0, y1 = max(0, int(ys.min()) - r), min(H, int(ys.max()) + r + 1)
    rows = slice(y0, y1)
    b = src.backing[:, :, rows]
    fine = [src.image[:, :, rows] - b, src.prior_fg[:, :, rows] - b, src.alpha[:, :, rows]]
    g = _neighbourhoods(fine, ys - y0, xs, r)
    H_img = src.image_size[0] if src.image_size is not None else H
    gy = (ys.float() + src.row0 + 0.5) / H_img * 2 - 1
    gx = (xs.float() + 0.5) / W * 2 - 1
    grid = torch.stack([gx, gy], -1).view(1, 1, n, 2)
    sig = F.grid_sample(src.sig1_low, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ctx = []
    for f in config.context:
        ctx.append(_neighbourhoods([src.coarse(f)], torch.div(ys, f, rounding_mode="floor"),
                                   torch.div(xs, f, rounding_mode="floor"), config.ctx_radius))
    noise = torch.log10(src.noise_std.clamp_min(1e-4)).view(1, 3).expand(n, 3)
    plate = src.backing[0, :, ys, xs].t()
    cd = colour_difference_alpha(src.image[0, :, ys, xs].t(), plate)
    return torch.cat([g, plate, cd.view(n, 1), sig.view(n, 1).clamp(0, 1), *ctx, noise], 1)


def refine_alpha(model: Refiner, src: FeatureSource, smooth: int = SMOOTH,
                 strength: float = STRENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined alpha (1, 1, H, W) and the band (1, 1, H, W) bool it was changed in; elsewhere the classical
    alpha is returned bit for bit. The per-pixel corrections are averaged over the band pixels of a
    (2 smooth + 1)^2 box (default SMOOTH), which removes their pixel-to-pixel noise, and `strength` of them
    (default STRENGTH) is applied."""
    band = band_mask(src.alpha)
    idx = band.view(-1).nonzero().view(-1)
    if idx.numel() == 0:
        return src.alpha.clone(), band
    W = src.alpha.shape[-1]
    delta = torch.zeros_like(src.alpha)
    flat = delta.view(-1)
    a0 = src.alpha.reshape(-1)
    with torch.no_grad():
        for s in range(0, idx.numel(), CHUNK):
            i = idx[s:s + CHUNK]
            flat[i] = model(features(src, torch.div(i, W, rounding_mode="floor"), i % W, model.config)) - a0[i]
        k = smooth
        if k > 0:
            y0, y1, x0, x1 = _bbox(band[0, 0], k)
            win = (slice(None), slice(None), slice(y0, y1), slice(x0, x1))
            bw = band[win].float()
            num = F.avg_pool2d(delta[win], 2 * k + 1, 1, k, count_include_pad=False)
            den = F.avg_pool2d(bw, 2 * k + 1, 1, k, count_include_pad=False)
            delta[win] = num / den.clamp_min(1e-6) * bw
    return (src.alpha + delta.mul_(strength)).clamp_(0, 1), band


def refine_fields(model: Refiner, x: torch.Tensor, kf) -> torch.Tensor:
    """GreenPost's refine hook: refined alpha (1, 1, h, W) for the image rows x (1, 3, h, W) and their
    classical fields (models/greenpost.KeyFields, possibly a band of rows of a larger image)."""
    src = FeatureSource(image=x, backing=kf.backing, prior_fg=kf.prior_fg, alpha=kf.alpha, sig1_low=kf.sig1_low,
                        noise_std=kf.noise_std, row0=kf.row0, image_size=kf.image_size)
    return refine_alpha(model, src)[0]


def _bbox(mask: torch.Tensor, pad: int) -> tuple[int, int, int, int]:
    """Bounding rows/columns of a non-empty (H, W) bool mask, widened by `pad` within the image."""
    rows = mask.any(1).nonzero().view(-1)
    cols = mask.any(0).nonzero().view(-1)
    H, W = mask.shape
    return (max(0, int(rows[0]) - pad), min(H, int(rows[-1]) + pad + 1),
            max(0, int(cols[0]) - pad), min(W, int(cols[-1]) + pad + 1))


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

    from .model_files import read_self_describing

    path = Path(path)
    _, meta, version = read_self_describing(
        path, kind=KIND, format_version=FORMAT_VERSION, what="GreenPost refiner",
        wrong_kind_hint="train one with train_refiner.py", save_hint="save refiners with save_refiner (safetensors)",
        missing_hint="reinstall the pack (the shipped weights are models/weights/greenpost_refiner.safetensors) or "
                     "use refiner 'off'")
    if version < FORMAT_VERSION:
        raise ValueError(f"{path.name} has refiner format version {version}, from an earlier version of the pack "
                         f"whose refiner read other inputs; this pack reads format {FORMAT_VERSION}: retrain it "
                         f"with train_refiner.py or use the shipped weights")
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
