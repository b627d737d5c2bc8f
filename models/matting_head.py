"""The matting head: a small conv net on the VAE decoder's own features that outputs alpha.

The paper (DiffuMatting, its "ConR" head) reads the Stable Diffusion VAE decoder's feature maps while
the latent is decoded and predicts a one-channel, sub-pixel alpha. Here:

- `HeadConfig` names the decoder submodules the head reads ("taps") and the head's widths; it is stored
  as JSON in the weights file so a loader rebuilds the head from the file alone.
- `MattingHead` fuses the finest tap (default: the input of the decoder's `conv_out`, i.e. the last
  up-block's features after `norm_out` + SiLU, full resolution) with 1x1 projections of coarser up-block
  outputs, and ends in a sigmoid. It has no normalisation layer with image-wide statistics, so it is a
  purely local function of the features: tiles and whole images give the same alpha.
- `HeadTaps` attaches the head to a decoder (a plain nn.Module) with forward hooks, so ONE decoder pass
  yields both the colour and the alpha. The head runs inside the hooks and only keeps small tensors,
  so a decode's peak memory does not grow with the tapped features.
- `save_head` / `load_head`: safetensors with metadata (kind, format version, config, VAE family).

Plain torch; never imports ComfyUI (the decoder is just an nn.Module here).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .atomic import atomic_path
from .model_files import config_from_json, read_self_describing

KIND = "matting_head"
FORMAT_VERSION = 1
# VAE families the head can be trained against. Both are KL-f8 decoders of the same architecture, with
# different weights: a head trained on one family's features is wrong on the other's.
VAE_FAMILIES = {
    "sd1": "SD1.x/SD2 KL-f8 VAE",
    "sdxl": "SDXL KL-f8 VAE",
}
# Largest sizes a head file may claim (SD1.x/SDXL decoders have 128-512 channels; a head is small). A
# file claiming more is refused before anything is allocated.
MAX_SIZES = {"fine_channels": 2048, "coarse_channels": 2048, "coarse_dim": 256, "hidden": 512,
             "latent_channels": 64, "upscale": 64}
FLOAT_DTYPES = ("F32", "F16", "BF16")
INPUT_SUFFIX = ":input"   # a tap "name:input" reads a module's input (forward pre-hook), else its output


@dataclass(frozen=True)
class HeadConfig:
    """Architecture of a matting head; module names are relative to the decoder (the `decoder` attribute
    of ComfyUI's AutoencoderKL, the `Decoder` class of comfy/ldm/modules/diffusionmodules/model.py)."""

    fine_tap: str = "conv_out" + INPUT_SUFFIX   # full-resolution features (norm_out + SiLU of the last up-block)
    fine_channels: int = 128
    coarse_taps: tuple[str, ...] = ("up.1.block.2",)  # output of the second-finest up level (1/2 resolution)
    coarse_channels: tuple[int, ...] = (256,)
    coarse_dim: int = 8      # channels each coarse tap is projected to (1x1 conv, inside the hook)
    hidden: int = 16         # width of the full-resolution layers
    latent_channels: int = 4
    upscale: int = 8         # pixels per latent pixel

    def __post_init__(self):
        object.__setattr__(self, "coarse_taps", tuple(self.coarse_taps))
        object.__setattr__(self, "coarse_channels", tuple(int(c) for c in self.coarse_channels))
        problems = []
        if not isinstance(self.fine_tap, str) or not self.fine_tap:
            problems.append(f"fine_tap must be a module name, got {self.fine_tap!r}")
        if len(self.coarse_taps) != len(self.coarse_channels):
            problems.append(f"coarse_taps ({len(self.coarse_taps)}) and coarse_channels "
                            f"({len(self.coarse_channels)}) must have the same length")
        if len(self.coarse_taps) > 2:
            problems.append(f"at most 2 coarse taps are supported, got {len(self.coarse_taps)}")
        for name, value in (("fine_channels", self.fine_channels), ("coarse_dim", self.coarse_dim),
                            ("hidden", self.hidden), ("latent_channels", self.latent_channels),
                            ("upscale", self.upscale), *(("coarse_channels", c) for c in self.coarse_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
            elif value > MAX_SIZES[name]:
                problems.append(f"{name}={value} is above the largest a matting head uses (at most "
                                f"{MAX_SIZES[name]}): the file is damaged or not a matting head")
        if problems:
            raise ValueError("invalid matting head config: " + "; ".join(problems))

    @property
    def taps(self) -> tuple[str, ...]:
        return (*self.coarse_taps, self.fine_tap)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HeadConfig":
        return config_from_json(cls, text, "matting head")

    @classmethod
    def for_decoder(cls, ch: int = 128, ch_mult=(1, 2, 4, 4), num_res_blocks: int = 2, coarse_levels: int = 1,
                    latent_channels: int = 4, hidden: int = 16, coarse_dim: int = 8) -> "HeadConfig":
        """The default head for a KL decoder with this architecture (SD1.x / SDXL: the defaults)."""
        coarse_levels = max(0, min(int(coarse_levels), len(ch_mult) - 1, 2))
        last = num_res_blocks  # the decoder has num_res_blocks + 1 blocks per up level
        taps = tuple(f"up.{level}.block.{last}" for level in range(coarse_levels, 0, -1))
        chans = tuple(ch * ch_mult[level] for level in range(coarse_levels, 0, -1))
        return cls(fine_channels=ch * ch_mult[0], coarse_taps=taps, coarse_channels=chans, hidden=hidden,
                   coarse_dim=coarse_dim, latent_channels=latent_channels, upscale=2 ** (len(ch_mult) - 1))

    @classmethod
    def for_vae_state_dict(cls, sd: dict, prefix: str = "decoder.", coarse_levels: int = 1,
                           **kwargs) -> "HeadConfig":
        """The default head for the KL decoder whose weights are `sd` (keys `<prefix>up.<i>.block.<j>...`).

        `prefix` is "decoder." for a VAE file and "first_stage_model.decoder." for a checkpoint.
        """
        key = prefix + "conv_out.weight"
        if key not in sd:
            raise ValueError(f"no {key!r} in the state dict: not a KL-f8 VAE decoder (SD1.x/SDXL); pass the "
                             f"prefix of its decoder keys")
        levels = sorted({int(k[len(prefix) + 3:].split(".")[0]) for k in sd if k.startswith(prefix + "up.")})
        blocks = sorted({int(k[len(prefix) + 3:].split(".")[2]) for k in sd
                         if k.startswith(prefix + "up.0.block.")})
        ch0 = sd[key].shape[1]
        ch_mult = [sd[f"{prefix}up.{lv}.block.0.conv2.weight"].shape[0] // ch0 for lv in levels]
        latent = sd[prefix + "conv_in.weight"].shape[1]
        return cls.for_decoder(ch=ch0, ch_mult=tuple(ch_mult), num_res_blocks=len(blocks) - 1,
                               coarse_levels=coarse_levels, latent_channels=latent, **kwargs)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv` applied in x's dtype and device (the head is tiny; the features are not: never cast them)."""
    w = conv.weight.to(device=x.device, dtype=x.dtype)
    b = conv.bias.to(device=x.device, dtype=x.dtype) if conv.bias is not None else None
    return F.conv2d(x, w, b, padding=conv.padding)


class MattingHead(nn.Module):
    """alpha = sigmoid(conv(silu(conv([conv3x3(fine), up(proj_1(coarse_1)), ...])))), full resolution.

    `forward(fine, coarse)` takes raw tap features (for training); the decode path calls `project(i, x)`
    in each coarse tap's hook and `fuse(fine, projections)` in the fine tap's hook.
    """

    def __init__(self, config: HeadConfig | None = None):
        super().__init__()
        self.config = config = config or HeadConfig()
        self.fine = nn.Conv2d(config.fine_channels, config.hidden, 3, padding=1)
        self.coarse = nn.ModuleList(nn.Conv2d(c, config.coarse_dim, 1) for c in config.coarse_channels)
        fused = config.hidden + config.coarse_dim * len(config.coarse_channels)
        self.mix = nn.Conv2d(fused, config.hidden, 3, padding=1)
        self.out = nn.Conv2d(config.hidden, 1, 1)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> "MattingHead":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for conv in (self.fine, *self.coarse, self.mix, self.out):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            w = torch.randn(conv.weight.shape, generator=gen) * math.sqrt(1.0 / fan_in)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.zero_()
        with torch.no_grad():  # start at alpha = 0.5 with a small slope: a neutral first guess
            self.out.weight.mul_(0.1)
        return self

    @staticmethod
    def _rms_normalised(x: torch.Tensor) -> torch.Tensor:
        """Per-pixel RMS over channels (local: tile-safe), for raw block outputs of arbitrary scale."""
        rms = torch.linalg.vector_norm(x, dim=1, keepdim=True) * (x.shape[1] ** -0.5)
        return rms.clamp_min(1e-4)

    def project(self, index: int, coarse: torch.Tensor) -> torch.Tensor:
        """Small projection of coarse tap `index` (its own resolution), scale-normalised per pixel."""
        expected = self.config.coarse_channels[index]
        if coarse.ndim != 4 or coarse.shape[1] != expected:
            raise ValueError(f"coarse tap {self.config.coarse_taps[index]!r} gave features of shape "
                             f"{tuple(coarse.shape)}, the head expects {expected} channels: the head was built "
                             f"for another decoder architecture")
        # conv1x1(x / rms) == conv1x1_without_bias(x) / rms + bias; avoids a full-size normalised copy.
        proj = self.coarse[index]
        y = F.conv2d(coarse, proj.weight.to(device=coarse.device, dtype=coarse.dtype))
        return y / self._rms_normalised(coarse) + proj.bias.to(device=coarse.device, dtype=coarse.dtype).view(1, -1, 1, 1)

    def fuse(self, fine: torch.Tensor, projections: list[torch.Tensor]) -> torch.Tensor:
        """Alpha (B,1,H,W) float32 in [0,1] from the fine features and the coarse projections."""
        if fine.ndim != 4 or fine.shape[1] != self.config.fine_channels:
            raise ValueError(f"fine tap {self.config.fine_tap!r} gave features of shape {tuple(fine.shape)}, the "
                             f"head expects {self.config.fine_channels} channels: the head was built for another "
                             f"decoder architecture")
        if len(projections) != len(self.coarse):
            raise ValueError(f"the head needs {len(self.coarse)} coarse tap(s) {self.config.coarse_taps}, got "
                             f"{len(projections)}: a coarse tap did not run before the fine tap")
        h, w = fine.shape[-2:]
        parts = [_conv(self.fine, fine)]
        for p in projections:
            if p.shape[-2:] != (h, w):
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            parts.append(p.to(fine.dtype))
        x = F.silu(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        x = F.silu(_conv(self.mix, x))
        # The last layer and the sigmoid run in float32: under a bf16/fp16 VAE the logits and the alpha would
        # otherwise carry 8 (bf16) significant bits, and a 16-bit alpha export would be 8-bit in disguise.
        return torch.sigmoid(_conv(self.out, x.float()))

    def forward(self, fine: torch.Tensor, coarse: list[torch.Tensor] | tuple = ()) -> torch.Tensor:
        return self.fuse(fine, [self.project(i, c) for i, c in enumerate(coarse)])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --- feature taps -------------------------------------------------------------------------------------
def _split_tap(tap: str) -> tuple[str, bool]:
    if tap.endswith(INPUT_SUFFIX):
        return tap[: -len(INPUT_SUFFIX)], True
    return tap, False


def _tap_module(root: nn.Module, tap: str) -> tuple[nn.Module, bool]:
    name, is_input = _split_tap(tap)
    modules = dict(root.named_modules())
    if name not in modules:
        near = sorted(n for n in modules if n.startswith(name.rsplit(".", 1)[0]))[:8]
        raise ValueError(f"the decoder has no submodule {name!r} (tap {tap!r}); this head was built for another "
                         f"decoder architecture (SD1.x/SDXL KL-f8 expected). Similar names: {near}")
    return modules[name], is_input


def _tensor_of(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise ValueError(f"a tapped module gave {type(value).__name__}, not a tensor")


class FeatureTaps:
    """Context manager: record (detached) features of named submodules during one forward pass.

    `with FeatureTaps(decoder, ["up.1.block.2", "conv_out:input"]) as taps: model.decode(z)`;
    then `taps.features[name]` is the last tensor seen there (for training the head).
    """

    def __init__(self, root: nn.Module, taps):
        self.root = root
        self.taps = tuple(taps)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "FeatureTaps":
        for tap in self.taps:
            module, is_input = _tap_module(self.root, tap)
            if is_input:
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, args, tap=tap: self._store(tap, args[0])))
            else:
                self._handles.append(module.register_forward_hook(
                    lambda m, args, out, tap=tap: self._store(tap, out)))
        return self

    def _store(self, tap, value):
        self.features[tap] = _tensor_of(value).detach()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


class HeadTaps:
    """Context manager: run `head` inside the decoder's own forward pass (one decode, colour + alpha).

    The coarse taps' hooks keep only the head's small projections; the fine tap's hook computes the alpha
    and keeps it. After each decoder call `pop_alpha()` returns (B,1,H,W) alpha. Nothing of the decoder
    is modified; the hooks are removed on exit, also on errors.
    """

    def __init__(self, decoder: nn.Module, head: MattingHead):
        self.decoder = decoder
        self.head = head
        self._proj: dict[int, torch.Tensor] = {}
        self._alpha: list[torch.Tensor] = []
        self._handles = []

    def __enter__(self) -> "HeadTaps":
        cfg = self.head.config
        try:
            for i, tap in enumerate(cfg.coarse_taps):
                self._attach(tap, lambda x, i=i: self._on_coarse(i, x))
            self._attach(cfg.fine_tap, self._on_fine)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _attach(self, tap, fn):
        module, is_input = _tap_module(self.decoder, tap)
        if is_input:
            self._handles.append(module.register_forward_pre_hook(lambda m, args: fn(_tensor_of(args[0]))))
        else:
            self._handles.append(module.register_forward_hook(lambda m, args, out: fn(_tensor_of(out))))

    def _on_coarse(self, index, x):
        self._proj[index] = self.head.project(index, x)

    def _on_fine(self, x):
        projections = [self._proj.pop(i) for i in range(len(self.head.coarse)) if i in self._proj]
        self._alpha.append(self.head.fuse(x, projections))
        self._proj.clear()

    def pop_alpha(self) -> torch.Tensor:
        """The alpha of the last decoder call (concatenated over internal batch splits)."""
        if not self._alpha:
            raise RuntimeError(f"the matting head's fine tap {self.head.config.fine_tap!r} did not run during the "
                               f"decode: the decoder does not call that module")
        alpha = self._alpha[0] if len(self._alpha) == 1 else torch.cat(self._alpha, dim=0)
        self._alpha.clear()
        return alpha

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._proj.clear()
        return False


# --- files ----------------------------------------------------------------------------------------------
def _check_family(family: str, what: str) -> str:
    if family not in VAE_FAMILIES:
        raise ValueError(f"{what} {family!r} is not a known VAE family; use one of "
                         f"{', '.join(f'{k!r} ({v})' for k, v in VAE_FAMILIES.items())}")
    return family


def save_head(path, head: MattingHead, vae_family: str, extra_meta: dict | None = None) -> Path:
    """Write `head` as safetensors with its config, VAE family and format version; atomic (temp + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"matting head files are saved as .safetensors, got {path.name!r}; rename it to "
                         f"{path.stem}.safetensors")
    _check_family(vae_family, "vae_family")
    meta = {str(k): str(v) for k, v in (extra_meta or {}).items()}
    reserved = {"kind", "format_version", "config", "vae_family"} & set(meta)
    if reserved:
        raise ValueError(f"extra_meta may not set the reserved keys {sorted(reserved)}")
    meta.update(kind=KIND, format_version=str(FORMAT_VERSION), config=head.config.to_json(), vae_family=vae_family,
                parameters=str(head.num_parameters()))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


@dataclass
class LoadedHead:
    """A head rebuilt from its file: module (eval, CPU, fp32), VAE family and the file's metadata."""

    head: MattingHead
    vae_family: str
    metadata: dict = field(default_factory=dict)
    path: str = ""

    @property
    def config(self) -> HeadConfig:
        return self.head.config


def _build_checked(path: Path, config: HeadConfig, header: dict) -> MattingHead:
    """The head of `config` with the file's weights: shapes and dtypes are checked against the config from
    the header first (the head is laid out on the meta device, nothing allocated), then the tensors are
    read and checked for NaN/Inf."""
    from safetensors.torch import load_file

    with torch.device("meta"):
        head = MattingHead(config)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    stored = {k: v for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if tuple(stored[k].get("shape", ())) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{path.name}: its tensors do not match its architecture config ({config.to_json()}): "
                         f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}; the file is damaged")
    not_float = sorted(k for k, v in stored.items() if v.get("dtype") not in FLOAT_DTYPES)
    if not_float:
        raise ValueError(f"{path.name}: tensors {not_float} are not floating point "
                         f"({stored[not_float[0]].get('dtype')}); the file is damaged or not a matting head")
    tensors = load_file(str(path))
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path.name}: weights {bad} hold NaN or infinite values (training diverged or the file "
                         f"is damaged); use an earlier or another head file")
    head = head.to_empty(device="cpu")
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return head.eval()


def load_head(path, expected_family: str | None = None) -> LoadedHead:
    """Rebuild a head from its safetensors file alone; refuses pickles, truncated files, files that are not
    matting heads, newer formats, sizes above MAX_SIZES, weights with NaN/Inf and (with `expected_family`) a
    head for another VAE family."""
    path = Path(path)
    header, meta, _ = read_self_describing(
        path, kind=KIND, format_version=FORMAT_VERSION, what="DiffuMatting matting head",
        wrong_kind_hint="load checkpoints and VAEs with ComfyUI's loaders and heads with the DiffuMatting head loader",
        save_hint="save the head with save_head (safetensors)")
    family = _check_family(meta.get("vae_family", ""), f"{path.name}: vae_family")
    if expected_family is not None:
        _check_family(expected_family, "expected VAE family")
        if expected_family != family:
            raise ValueError(f"{path.name} was trained for the {VAE_FAMILIES[family]} ({family!r}) but is used "
                             f"with the {VAE_FAMILIES[expected_family]} ({expected_family!r}); use a head trained "
                             f"for {expected_family!r}")
    try:
        config = HeadConfig.from_json(meta.get("config", ""))
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None
    head = _build_checked(path, config, header)
    return LoadedHead(head=head, vae_family=family, metadata=dict(meta), path=os.fspath(path))
