"""Trainer configuration: sections of typed keys with documented defaults, TOML files, presets and
`section.key=value` overrides, validated at start with errors that say what to change.

Precedence (later wins): defaults < preset < --config file < CLI flags / --set.
configs/default.toml documents every key; configs/tiny.toml is the `--preset tiny` run.
"""
from __future__ import annotations

import copy
import difflib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ("tiny",)


@dataclass
class RunConfig:
    out: str = "runs/diffumatting"          # output folder: checkpoints/, samples/, log.csv, final files
    seed: int = 0                           # seeds data order, augmentations, noise and timesteps
    stages: list = field(default_factory=lambda: ["unet", "head"])   # which stages run, in this order
    device: str = "auto"                    # auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)
    mixed_precision: str = "auto"           # auto (bf16 on GPUs that have it, else fp16; off on CPU) | no | fp16 | bf16
    gradient_checkpointing: str = "auto"    # auto (on for GPU full fine-tunes) | on | off
    threads: int = 0                        # torch CPU threads per process; 0 = torch's default
    log_every: int = 10                     # steps between CSV log rows (the progress bar shows every step)
    sample_every: int = 0                   # steps between sample grids; 0 = only at the end of each stage
    checkpoint_every: int = 250             # steps between resumable checkpoints (plus one at each stage end)
    keep_checkpoints: int = 3               # how many resumable checkpoints to keep (oldest deleted)
    progress: bool = True                   # tqdm progress bar on rank 0
    comfyui: str = ""                       # ComfyUI folder (holds main.py); "" = auto-detect
    ddp_find_unused: bool = False           # DistributedDataParallel(find_unused_parameters=...)
    sample_count: int = 4                   # images per sample grid
    sample_steps: int = 20                  # DDIM steps for the UNet stage's sample grids
    sample_cfg: float = 5.0                 # classifier-free guidance of the sample grids


@dataclass
class ModelConfig:
    checkpoint: str = ""                    # base SD1.x/SD2/SDXL checkpoint (.safetensors), loaded by ComfyUI
    tiny: bool = False                      # build a tiny random SD1.5-shaped checkpoint instead (tests, presets)
    tiny_seed: int = 0
    prediction: str = "auto"                # auto (what the checkpoint predicts) | eps | v


@dataclass
class DataConfig:
    source: str = "folder"                  # folder | synthetic (procedural objects, models/synthetic.py)
    path: str = ""                          # folder: RGBA PNGs, or image/ + alpha/ subfolders (pairs)
    layout: str = "auto"                    # auto | rgba | pairs
    caption_template: str = "a photo of {name}"   # when no sidecar <stem>.txt; {name} = file stem in words
    resolution: int = 512                   # square training size (multiple of 64)
    scale_min: float = 0.55                 # object size range, as a fraction of the canvas side
    scale_max: float = 0.95
    flip: bool = True                       # random horizontal flips
    realism: float = 1.0                    # 0..1 strength of backing falloff, shadow, spill, noise and blur
    caption_dropout: float = 0.05           # fraction of captions replaced by "" (keeps CFG working)
    holdout: int = 8                        # samples kept out of training, used for the measures
    synthetic_count: int = 512              # source = synthetic: number of distinct objects
    cache_latents: bool = False             # cache VAE latents on disk (UNet stage); augmentations then cycle
    cache_variants: int = 4                 # ... through this many fixed variants per sample
    cache_dir: str = ""                     # latent cache folder; "" = <out>/cache/latents (shareable between runs)


@dataclass
class UnetConfig:
    mode: str = "lora"                      # lora (writes a kohya LoRA) | full (writes a full UNet)
    steps: int = 2000
    batch_size: int = 4                     # global batch (split over torchrun ranks)
    lr: float = 1e-4                        # 1e-4 suits LoRA; use ~1e-5 for full fine-tunes
    warmup: int = 50                        # linear warm-up steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0                  # max gradient norm; 0 = off
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                                                        "ff.net.0.proj", "ff.net.2"])
    phrase: str = ""                        # green-canvas phrase added to captions; "" = the pack's default
    timestep_min: int = 0
    timestep_max: int = 1000
    save_dtype: str = "fp16"                # dtype of the exported UNet / LoRA: fp16 | bf16 | fp32


@dataclass
class LossConfig:
    diffusion: float = 1.0                  # weight of the epsilon / v MSE
    green: float = 0.5                      # weight of the green-background control loss (0 = off)
    green_factors: list = field(default_factory=lambda: [2, 4])   # attention maps at latent/2 and latent/4
    green_parts: list = field(default_factory=lambda: ["input", "middle", "output"])
    detail: float = 0.1                     # weight of the transition-boundary (Sobel) detail loss (0 = off)
    detail_band_weight: float = 4.0         # extra weight on the band 0 < alpha < 1


@dataclass
class HeadConfigT:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    warmup: int = 20
    grad_clip: float = 1.0
    coarse_levels: int = 1                  # coarse decoder taps fused with the finest (0..2)
    hidden: int = 16
    w_l1: float = 1.0
    w_grad: float = 1.0
    w_comp: float = 0.5
    w_bce: float = 1.0                      # binary cross-entropy on alpha: keeps the sigmoid out of saturation
                                            # (L1 alone can collapse to the all-background answer)
    vae_family: str = "auto"                # auto (from the checkpoint) | sd1 | sdxl
    feature_cache: bool = False             # keep decoder features of data.cache_variants variants per sample in
                                            # RAM (small data sets / low resolution only: 128 x H x W floats each)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    unet: UnetConfig = field(default_factory=UnetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    head: HeadConfigT = field(default_factory=HeadConfigT)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


SECTIONS = {f.name: f.type for f in fields(TrainConfig)}
_SECTION_CLASSES = {"run": RunConfig, "model": ModelConfig, "data": DataConfig, "unet": UnetConfig,
                    "loss": LossConfig, "head": HeadConfigT}
# Keys that must not change when a run is resumed (they decide data order, shapes and the model).
IDENTITY_KEYS = ("run.seed", "model.checkpoint", "model.tiny", "model.tiny_seed", "data.source", "data.path",
                 "data.resolution", "data.synthetic_count", "data.holdout", "unet.mode", "unet.batch_size",
                 "unet.lora_rank", "unet.lora_targets", "head.batch_size", "head.coarse_levels", "head.hidden")


class ConfigError(ValueError):
    pass


def _suggest(name, options) -> str:
    near = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _coerce(value, default, where: str):
    """Convert `value` (from TOML or a --set string) to the type of `default`."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(default, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if isinstance(default, list):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = tomllib.loads(f"v = {text}")["v"]
                except tomllib.TOMLDecodeError as e:
                    raise ConfigError(f"{where}: cannot read list {value!r} ({e})") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if default and isinstance(default[0], int):
            return [_coerce(v, 0, where) for v in value]
        return [str(v) for v in value]
    if isinstance(default, str):
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def apply_dict(cfg: TrainConfig, data: dict, origin: str) -> TrainConfig:
    """Merge a nested {section: {key: value}} dict into cfg (unknown names are errors)."""
    for section, values in data.items():
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"{origin}: unknown section [{section}]{_suggest(section, _SECTION_CLASSES)}; "
                              f"sections are {', '.join(_SECTION_CLASSES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table of keys")
        obj = getattr(cfg, section)
        names = {f.name for f in fields(obj)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"{origin}: unknown key {section}.{key}{_suggest(key, names)}; "
                                  f"[{section}] has {', '.join(sorted(names))}")
            setattr(obj, key, _coerce(value, getattr(obj, key), f"{origin}: {section}.{key}"))
    return cfg


def load_toml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path.name} is not valid TOML: {e}") from None


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; presets are {', '.join(PRESETS)}")
    return CONFIG_DIR / f"{name}.toml"


def parse_set(items) -> dict:
    """['unet.lr=1e-5', ...] -> {'unet': {'lr': '1e-5'}}."""
    out: dict = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set unet.lr=1e-5")
        name, value = item.split("=", 1)
        section, key = name.strip().split(".", 1)
        out.setdefault(section, {})[key] = value.strip()
    return out


def from_dict(data: dict) -> TrainConfig:
    return apply_dict(TrainConfig(), data, "stored config")


def get_key(cfg: TrainConfig, dotted: str):
    section, key = dotted.split(".", 1)
    return getattr(getattr(cfg, section), key)


def changed_identity(old: TrainConfig, new: TrainConfig) -> list[str]:
    return [k for k in IDENTITY_KEYS if get_key(old, k) != get_key(new, k)]


def validate(cfg: TrainConfig, world_size: int = 1) -> TrainConfig:
    """Check values; raises ConfigError listing every problem with its fix."""
    p = []
    r, m, d, u, lo, h = cfg.run, cfg.model, cfg.data, cfg.unet, cfg.loss, cfg.head
    bad_stages = [s for s in r.stages if s not in ("unet", "head")]
    if bad_stages or not r.stages or len(set(r.stages)) != len(r.stages):
        p.append(f"run.stages {r.stages!r}: use a list of distinct 'unet' and/or 'head'")
    if not r.out:
        p.append("run.out is empty: give an output folder (--out DIR)")
    if r.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        p.append(f"run.mixed_precision {r.mixed_precision!r}: use auto, no, fp16 or bf16")
    if r.gradient_checkpointing not in ("auto", "on", "off"):
        p.append(f"run.gradient_checkpointing {r.gradient_checkpointing!r}: use auto, on or off")
    if not (r.device in ("auto", "cpu", "cuda") or r.device.startswith("cuda:")):
        p.append(f"run.device {r.device!r}: use auto, cpu, cuda or cuda:N")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints", "sample_count", "sample_steps"):
        if getattr(r, name) < 1:
            p.append(f"run.{name} must be >= 1, got {getattr(r, name)}")
    for name in ("sample_every", "threads"):
        if getattr(r, name) < 0:
            p.append(f"run.{name} must be >= 0, got {getattr(r, name)}")
    if not m.tiny and not m.checkpoint:
        p.append("model.checkpoint is empty: pass --checkpoint path/to/sd15.safetensors (or --preset tiny)")
    elif not m.tiny:
        cp = Path(m.checkpoint)
        if cp.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
            p.append(f"model.checkpoint {cp.name!r} is a pickle file, which can run code when loaded; "
                     f"convert it to .safetensors")
        elif not cp.is_file():
            p.append(f"model.checkpoint {m.checkpoint!r} does not exist")
    if m.prediction not in ("auto", "eps", "v"):
        p.append(f"model.prediction {m.prediction!r}: use auto, eps or v")
    if d.source not in ("folder", "synthetic"):
        p.append(f"data.source {d.source!r}: use folder or synthetic")
    if d.source == "folder":
        if not d.path:
            p.append("data.path is empty: pass --data DIR (RGBA PNGs or image/ + alpha/ pairs) or use "
                     "data.source = 'synthetic'")
        elif not Path(d.path).is_dir():
            p.append(f"data.path {d.path!r} is not a folder")
    if d.layout not in ("auto", "rgba", "pairs"):
        p.append(f"data.layout {d.layout!r}: use auto, rgba or pairs")
    if d.resolution < 64 or d.resolution % 64:
        p.append(f"data.resolution {d.resolution} must be a multiple of 64 (>= 64)")
    if not 0 < d.scale_min <= d.scale_max <= 1.0:
        p.append(f"data.scale_min/scale_max ({d.scale_min}, {d.scale_max}) must satisfy 0 < min <= max <= 1")
    if not 0 <= d.realism <= 1:
        p.append(f"data.realism {d.realism} must be in [0, 1]")
    if not 0 <= d.caption_dropout < 1:
        p.append(f"data.caption_dropout {d.caption_dropout} must be in [0, 1)")
    if d.holdout < 0 or d.synthetic_count < 1 or d.cache_variants < 1:
        p.append("data.holdout must be >= 0, data.synthetic_count and data.cache_variants >= 1")
    if "{name}" not in d.caption_template and "{" in d.caption_template:
        p.append(f"data.caption_template {d.caption_template!r}: the only placeholder is {{name}}")
    if u.mode not in ("lora", "full"):
        p.append(f"unet.mode {u.mode!r}: use lora or full")
    for sec, c in (("unet", u), ("head", h)):
        if c.steps < 0:
            p.append(f"{sec}.steps must be >= 0, got {c.steps}")
        if c.batch_size < 1 or c.batch_size % world_size:
            p.append(f"{sec}.batch_size {c.batch_size} must be a positive multiple of the {world_size} "
                     f"process(es) (it is the global batch, split over torchrun ranks)")
        if not c.lr > 0:
            p.append(f"{sec}.lr must be > 0, got {c.lr}")
        if c.warmup < 0 or c.grad_clip < 0:
            p.append(f"{sec}.warmup and {sec}.grad_clip must be >= 0")
    if u.lora_rank < 1 or u.lora_alpha <= 0:
        p.append("unet.lora_rank must be >= 1 and unet.lora_alpha > 0")
    if not 0 <= u.timestep_min < u.timestep_max <= 1000:
        p.append(f"unet.timestep_min/max ({u.timestep_min}, {u.timestep_max}) must satisfy 0 <= min < max <= 1000")
    if u.save_dtype not in ("fp16", "bf16", "fp32"):
        p.append(f"unet.save_dtype {u.save_dtype!r}: use fp16, bf16 or fp32")
    for name in ("diffusion", "green", "detail", "detail_band_weight"):
        if getattr(lo, name) < 0:
            p.append(f"loss.{name} must be >= 0, got {getattr(lo, name)}")
    if lo.diffusion == 0 and lo.green == 0 and lo.detail == 0:
        p.append("all loss weights are 0: nothing to train")
    if not lo.green_factors or any(f not in (1, 2, 4, 8, 16) for f in lo.green_factors):
        p.append(f"loss.green_factors {lo.green_factors}: use a list of 1, 2, 4, 8 (latent size / factor)")
    if any(x not in ("input", "middle", "output") for x in lo.green_parts) or not lo.green_parts:
        p.append(f"loss.green_parts {lo.green_parts}: use a list of input, middle, output")
    if not 0 <= h.coarse_levels <= 2 or h.hidden < 1:
        p.append("head.coarse_levels must be 0..2 and head.hidden >= 1")
    if h.vae_family not in ("auto", "sd1", "sdxl"):
        p.append(f"head.vae_family {h.vae_family!r}: use auto, sd1 or sdxl")
    if p:
        raise ConfigError("invalid training configuration:\n  - " + "\n  - ".join(p))
    return cfg


def build(preset: str | None = None, config_file: str | None = None, overrides: dict | None = None,
          base: TrainConfig | None = None) -> TrainConfig:
    cfg = copy.deepcopy(base) if base is not None else TrainConfig()
    if preset:
        apply_dict(cfg, load_toml(preset_path(preset)), f"preset {preset}")
    if config_file:
        apply_dict(cfg, load_toml(config_file), Path(config_file).name)
    if overrides:
        apply_dict(cfg, overrides, "command line")
    return cfg


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML (written to <out>/config.toml at the start of a run)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))
