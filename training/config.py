"""Trainer configuration, declared once.

Every key is a dataclass field made with `key(default, doc, ...)`: its type (a `Literal` lists the allowed
choices), its documentation, its numeric range and whether it is part of a run's identity (what `--resume`
refuses to change). Validation, the TOML files a run writes and the shipped `configs/default.toml` are all
derived from these declarations (`default_toml()`; a test checks the shipped file equals it).

Precedence (later wins): defaults < preset < --config file < CLI flags / --set.
configs/tiny.toml is the `--preset tiny` run.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (ComfyUI supports >= 3.10): the same parser, published as tomli
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        raise ImportError("the trainer reads TOML configs: on Python 3.10 it needs the `tomli` package "
                          "(`pip install -r requirements.txt` installs it there); Python 3.11 and newer have "
                          "it built in as tomllib") from None

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ("tiny",)
MAX_SEED = 2**32 - 1

Stage = Literal["unet", "head"]
Device = str   # auto | cpu | cuda | cuda:N, checked by validate()
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
Switch = Literal["auto", "on", "off"]
Prediction = Literal["auto", "eps", "v"]
Source = Literal["folder", "synthetic"]
Layout = Literal["auto", "rgba", "pairs"]
ForegroundMode = Literal["auto", "given", "estimate"]
HeadKey = Literal["random", "fixed"]
UnetMode = Literal["lora", "full"]
SaveDtype = Literal["fp16", "bf16", "fp32"]
GreenTokens = Literal["phrase", "all"]
DetailWeighting = Literal["low_noise", "sqrt_alpha_bar"]
Part = Literal["input", "middle", "output"]
VaeFamily = Literal["auto", "sd1", "sdxl"]
GreenFactor = Literal[1, 2, 4, 8, 16]

DEFAULT_LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                        "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
CHROMA_GREEN = [0.0, 0.694, 0.251]   # #00b140, the usual chroma-key green


def key(default, doc: str, *, lo=None, hi=None, lo_open: bool = False, identity: bool = False,
        nonempty: bool = False, length: int | None = None):
    """A config key: default, one-line doc, optional range [lo, hi] (lo_open: lo excluded), identity flag."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "identity": identity, "nonempty": nonempty,
            "length": length}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    out: str = key("runs/diffumatting", "output folder: checkpoints/, samples/, log.csv, config.toml, "
                   "summary.json", nonempty=True)
    seed: int = key(0, "seeds data order, augmentations, noise, timesteps and caption dropout", lo=0, hi=MAX_SEED,
                    identity=True)
    stages: list[Stage] = key(["unet", "head"], "stages to run, in order: the UNet fine-tune, then the matting head",
                              nonempty=True)
    device: Device = key("auto", "auto | cpu | cuda | cuda:N (under torchrun each rank uses cuda:LOCAL_RANK)")
    mixed_precision: MixedPrecision = key("auto", "autocast dtype: auto = bf16 where the GPU has it, else fp16; "
                                          "off on the CPU")
    gradient_checkpointing: Switch = key("auto", "recompute UNet blocks in the backward pass: auto = on for "
                                         "GPU full fine-tunes")
    threads: int = key(0, "torch CPU threads per process; 0 = torch's default", lo=0, hi=1024)
    log_every: int = key(10, "steps between rows of log.csv (the progress bar shows every step)", lo=1)
    sample_every: int = key(0, "steps between sample grids in samples/; 0 = only at the end of each stage", lo=0)
    checkpoint_every: int = key(250, "steps between resumable checkpoints (one is also written at each stage end)",
                                lo=1)
    keep_checkpoints: int = key(3, "checkpoints kept (older deleted); only the newest keeps the optimizer state",
                                lo=1)
    progress: bool = key(True, "tqdm progress bar with the losses (rank 0)")
    comfyui: str = key("", "ComfyUI folder (with main.py); \"\" = $COMFYUI_PATH, the ComfyUI this pack is in, "
                       ".host/")
    ddp_find_unused: bool = key(False, "DistributedDataParallel(find_unused_parameters=...): true if a rank "
                                "errors on unused parameters")
    sample_count: int = key(4, "images per sample grid", lo=1)
    sample_steps: int = key(20, "DDIM steps of the UNet stage's sample grids", lo=1)
    sample_cfg: float = key(5.0, "classifier-free guidance of the sample grids", lo=0.0)


@dataclass
class ModelConfig:
    checkpoint: str = key("", "base SD1.x / SD2 / SDXL checkpoint (.safetensors), loaded by ComfyUI's loader",
                          identity=True)
    tiny: bool = key(False, "build a tiny random SD1.5-shaped checkpoint in <out> instead (tests, --preset tiny)",
                     identity=True)
    tiny_seed: int = key(0, "seed of the tiny checkpoint's random weights", lo=0, hi=MAX_SEED, identity=True)
    prediction: Prediction = key("auto", "what the UNet predicts: auto = what the checkpoint says")


@dataclass
class DataConfig:
    source: Source = key("folder", "folder (your images) | synthetic (procedural objects, models/synthetic.py)",
                         identity=True)
    path: str = key("", "folder of RGBA PNGs, or fg/ (or image/) + alpha/ subfolders matched by file stem",
                    identity=True)
    layout: Layout = key("auto", "auto | rgba (PNGs with alpha) | pairs (colour folder + alpha folder)")
    foreground: ForegroundMode = key("auto", "pairs layout: auto = fg/ is the foreground, photos (image/) get an "
                                     "estimated one; given = use the colour files as they are; estimate = always "
                                     "estimate (multi-level foreground estimation)")
    caption_template: str = key("a photo of {name}", "used without a sidecar <stem>.txt; {name} = the file stem "
                                "in words")
    resolution: int = key(512, "square training size in pixels (multiple of 64)", lo=64, identity=True)
    scale_min: float = key(0.55, "smallest object size, as a fraction of the canvas side", lo=0.0, hi=1.0,
                           lo_open=True)
    scale_max: float = key(0.95, "largest object size, as a fraction of the canvas side", lo=0.0, hi=1.0,
                           lo_open=True)
    flip: bool = key(True, "random horizontal flips")
    key_color: list[float] = key(CHROMA_GREEN, "UNet stage: the one flat canvas colour (r, g, b in 0..1)",
                                 lo=0.0, hi=1.0, length=3)
    unet_realism: float = key(0.0, "UNet stage: 0..1 strength of backing falloff, shadow, spill, noise and blur "
                              "(0 = the paper's pure flat canvas)", lo=0.0, hi=1.0)
    head_realism: float = key(1.0, "head stage: 0..1 strength of backing falloff, shadow, spill, noise and blur",
                              lo=0.0, hi=1.0)
    head_key: HeadKey = key("random", "head stage key colour: random (a varied green per sample) | fixed "
                            "(data.key_color)")
    caption_dropout: float = key(0.05, "fraction of captions replaced by \"\" (keeps classifier-free guidance "
                                 "working)", lo=0.0, hi=0.999)
    holdout: int = key(8, "samples kept out of training for the measures (the last files of the folder)", lo=0,
                       identity=True)
    synthetic_count: int = key(512, "source = synthetic: number of distinct objects", lo=1, identity=True)
    cache_latents: bool = key(False, "cache VAE latents on disk (UNet stage); augmentations then cycle through")
    cache_variants: int = key(4, "... this many fixed variants per sample (also the head's feature cache)", lo=1)
    cache_dir: str = key("", "latent cache folder; \"\" = <out>/cache/latents")


@dataclass
class UnetConfig:
    mode: UnetMode = key("lora", "lora (writes a kohya LoRA for LoraLoader) | full (writes a full UNet)",
                         identity=True)
    steps: int = key(2000, "optimizer steps of the UNet stage", lo=0)
    batch_size: int = key(4, "global batch; under torchrun split evenly over the ranks", lo=1, identity=True)
    lr: float = key(1e-4, "learning rate: 1e-4 suits LoRA; use about 1e-5 for full fine-tunes", lo=0.0,
                    lo_open=True)
    warmup: int = key(50, "linear learning-rate warm-up steps", lo=0)
    weight_decay: float = key(0.0, "AdamW weight decay", lo=0.0)
    grad_clip: float = key(1.0, "max gradient norm; 0 = off", lo=0.0)
    lora_rank: int = key(16, "LoRA rank", lo=1, identity=True)
    lora_alpha: float = key(16.0, "LoRA alpha (scale = alpha / rank)", lo=0.0, lo_open=True)
    lora_targets: list[str] = key(DEFAULT_LORA_TARGETS, "Linear layers that get adapters (module name suffixes)",
                                  identity=True, nonempty=True)
    phrase: str = key("", "green-canvas phrase appended to captions; \"\" = the pack's default phrase")
    timestep_min: int = key(0, "training timesteps are drawn uniformly from [min, max)", lo=0, hi=999)
    timestep_max: int = key(1000, "upper end (excluded) of the training timesteps", lo=1, hi=1000)
    save_dtype: SaveDtype = key("fp16", "dtype of the written UNet / LoRA")


@dataclass
class LossConfig:
    diffusion: float = key(1.0, "weight of the epsilon / v MSE", lo=0.0)
    green: float = key(0.5, "weight of the green-background control loss (0 = off)", lo=0.0)
    green_tokens: GreenTokens = key("phrase", "which \"green\" tokens are pulled toward the background: phrase = "
                                    "only the canvas phrase's (\"a green apple\" keeps its own); all = every one")
    green_factors: list[GreenFactor] = key([2, 4], "cross-attention maps read at latent/factor (SD1.5 at 512: "
                                           "2 = 32x32, 4 = 16x16)", nonempty=True)
    green_parts: list[Part] = key(["input", "middle", "output"], "UNet parts whose cross-attention is supervised",
                                  nonempty=True)
    detail: float = key(0.1, "weight of the transition-boundary (Sobel) detail loss (0 = off)", lo=0.0)
    detail_band_weight: float = key(4.0, "extra weight where 0 < alpha < 1", lo=0.0)
    detail_weighting: DetailWeighting = key("low_noise", "per-sample weight of the detail loss: low_noise = its "
                                            "gradient on the model output scales with alpha_bar (edges form at low "
                                            "noise); sqrt_alpha_bar = the old weighting, largest at high noise")


@dataclass
class HeadConfigT:
    steps: int = key(1000, "optimizer steps of the matting-head stage", lo=0)
    batch_size: int = key(4, "global batch; under torchrun split evenly over the ranks", lo=1, identity=True)
    lr: float = key(1e-3, "learning rate", lo=0.0, lo_open=True)
    warmup: int = key(20, "linear learning-rate warm-up steps", lo=0)
    grad_clip: float = key(1.0, "max gradient norm; 0 = off", lo=0.0)
    coarse_levels: int = key(1, "coarse decoder taps fused with the finest one", lo=0, hi=2, identity=True)
    hidden: int = key(16, "hidden channels of the head", lo=1, identity=True)
    w_l1: float = key(1.0, "weight of the alpha L1", lo=0.0)
    w_grad: float = key(1.0, "weight of the alpha gradient (Sobel) L1", lo=0.0)
    w_comp: float = key(0.5, "weight of the composition L1", lo=0.0)
    w_bce: float = key(1.0, "weight of the binary cross-entropy on alpha (keeps the sigmoid out of saturation)",
                       lo=0.0)
    vae_family: VaeFamily = key("auto", "VAE family written into the head file: auto = from the checkpoint")
    feature_cache: bool = key(False, "keep decoder features in RAM (small data / low resolution only)")


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


_SECTION_CLASSES = {f.name: f.default_factory for f in fields(TrainConfig)}


class ConfigError(ValueError):
    """A setting (or a run folder) the trainer cannot use; the message says what to change."""


@dataclass(frozen=True)
class KeySpec:
    section: str
    name: str
    type: object
    default: object
    doc: str
    lo: object
    hi: object
    lo_open: bool
    identity: bool
    nonempty: bool
    length: int | None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def choices(self) -> tuple | None:
        t = self.element_type if self.is_list else self.type
        return typing.get_args(t) if typing.get_origin(t) is Literal else None

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.type) is list

    @property
    def element_type(self):
        return typing.get_args(self.type)[0] if self.is_list else self.type

    @property
    def base_type(self) -> type:
        t = self.element_type
        if typing.get_origin(t) is Literal:
            return type(typing.get_args(t)[0])
        return t


def specs() -> list[KeySpec]:
    """Every config key, in declaration order."""
    out = []
    for section, cls in _SECTION_CLASSES.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            m = f.metadata
            out.append(KeySpec(section, f.name, hints[f.name], default, m["doc"], m["lo"], m["hi"], m["lo_open"],
                               m["identity"], m["nonempty"], m["length"]))
    return out


def spec_map() -> dict[str, KeySpec]:
    return {s.dotted: s for s in specs()}


IDENTITY_KEYS = tuple(s.dotted for s in specs() if s.identity)


def _suggest(name, options) -> str:
    near = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce_scalar(value, base: type, where: str):
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if base is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if base is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return str(value)


def _coerce(value, spec: KeySpec, where: str):
    """Convert `value` (from TOML or a --set string) to the key's declared type."""
    if not spec.is_list:
        return _coerce_scalar(value, spec.base_type, where)
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
    return [_coerce_scalar(v, spec.base_type, where) for v in value]


def apply_dict(cfg: TrainConfig, data: dict, origin: str) -> TrainConfig:
    """Merge a nested {section: {key: value}} dict into cfg (unknown names are errors)."""
    table = spec_map()
    for section, values in data.items():
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"{origin}: unknown section [{section}]{_suggest(section, _SECTION_CLASSES)}; "
                              f"sections are {', '.join(_SECTION_CLASSES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table of keys")
        obj = getattr(cfg, section)
        names = [f.name for f in fields(obj)]
        for name, value in values.items():
            if name not in names:
                raise ConfigError(f"{origin}: unknown key {section}.{name}{_suggest(name, names)}; "
                                  f"[{section}] has {', '.join(sorted(names))}")
            setattr(obj, name, _coerce(value, table[f"{section}.{name}"], f"{origin}: {section}.{name}"))
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
        section, name = name.strip().split(".", 1)
        out.setdefault(section, {})[name] = value.strip()
    return out


def from_dict(data: dict) -> TrainConfig:
    return apply_dict(TrainConfig(), data, "stored config")


def get_key(cfg: TrainConfig, dotted: str):
    section, name = dotted.split(".", 1)
    return getattr(getattr(cfg, section), name)


def changed_identity(old: TrainConfig, new: TrainConfig) -> list[str]:
    return [k for k in IDENTITY_KEYS if get_key(old, k) != get_key(new, k)]


def _range_text(s: KeySpec) -> str:
    lo = "" if s.lo is None else (f"> {s.lo}" if s.lo_open else f">= {s.lo}")
    hi = "" if s.hi is None else f"<= {s.hi}"
    return " and ".join(x for x in (lo, hi) if x)


def _check_value(s: KeySpec, v, p: list[str]) -> None:
    """One scalar value against its declaration (choices, finiteness, range)."""
    if s.choices is not None:
        if v not in s.choices:
            p.append(f"{s.dotted} {v!r}: use one of {', '.join(repr(c) for c in s.choices)}")
        return
    if isinstance(v, float) and not math.isfinite(v):
        p.append(f"{s.dotted} is {v}: it must be a finite number ({_range_text(s) or 'any finite value'})")
        return
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        too_low = s.lo is not None and (v <= s.lo if s.lo_open else v < s.lo)
        too_high = s.hi is not None and v > s.hi
        if too_low or too_high:
            p.append(f"{s.dotted} must be {_range_text(s)}, got {v}")


def check_declared(cfg: TrainConfig) -> list[str]:
    """Problems with single keys, from their declarations alone."""
    p: list[str] = []
    for s in specs():
        v = get_key(cfg, s.dotted)
        if s.is_list:
            if s.nonempty and not v:
                p.append(f"{s.dotted} is empty: give at least one value (default {s.default!r})")
            if s.length is not None and len(v) != s.length:
                p.append(f"{s.dotted} {v!r}: give exactly {s.length} values")
            for x in v:
                _check_value(s, x, p)
        else:
            if s.nonempty and not v:
                p.append(f"{s.dotted} is empty (default {s.default!r})")
            _check_value(s, v, p)
    return p


def _check_relations(cfg: TrainConfig, world_size: int) -> list[str]:
    """Problems that involve several keys, files or the process count."""
    p = []
    r, m, d, u, lo, h = cfg.run, cfg.model, cfg.data, cfg.unet, cfg.loss, cfg.head
    if len(set(r.stages)) != len(r.stages):
        p.append(f"run.stages {r.stages!r}: list each stage once")
    if not (r.device in ("auto", "cpu", "cuda") or (r.device.startswith("cuda:") and r.device[5:].isdigit())):
        p.append(f"run.device {r.device!r}: use auto, cpu, cuda or cuda:N")
    if not m.tiny and not m.checkpoint:
        p.append("model.checkpoint is empty: pass --checkpoint path/to/sd15.safetensors (or --preset tiny)")
    elif not m.tiny:
        cp = Path(m.checkpoint)
        if cp.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
            p.append(f"model.checkpoint {cp.name!r} is a pickle file, which can run code when loaded; "
                     f"convert it to .safetensors")
        elif not cp.is_file():
            p.append(f"model.checkpoint {m.checkpoint!r} does not exist")
    if d.source == "folder":
        if not d.path:
            p.append("data.path is empty: pass --data DIR (RGBA PNGs or fg/ + alpha/ pairs) or use "
                     "data.source = 'synthetic'")
        elif not Path(d.path).is_dir():
            p.append(f"data.path {d.path!r} is not a folder")
    if d.resolution % 64:
        p.append(f"data.resolution {d.resolution} must be a multiple of 64 (>= 64)")
    if d.scale_min > d.scale_max:
        p.append(f"data.scale_min/scale_max ({d.scale_min}, {d.scale_max}) must satisfy min <= max")
    if "{name}" not in d.caption_template and "{" in d.caption_template:
        p.append(f"data.caption_template {d.caption_template!r}: the only placeholder is {{name}}")
    for sec, c in (("unet", u), ("head", h)):
        if c.batch_size % world_size:
            p.append(f"{sec}.batch_size {c.batch_size} must be a positive multiple of the {world_size} "
                     f"process(es) (it is the global batch, split over torchrun ranks)")
    if u.timestep_min >= u.timestep_max:
        p.append(f"unet.timestep_min/max ({u.timestep_min}, {u.timestep_max}) must satisfy min < max")
    if lo.diffusion == 0 and lo.green == 0 and lo.detail == 0:
        p.append("all loss weights are 0: nothing to train")
    return p


def validate(cfg: TrainConfig, world_size: int = 1) -> TrainConfig:
    """Check values; raises ConfigError listing every problem with its fix."""
    p = check_declared(cfg)
    p += _check_relations(cfg, world_size)
    if len(p) == 1:
        raise ConfigError(f"invalid training configuration: {p[0]}")
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


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _comment(s: KeySpec) -> str:
    extra = []
    if s.choices is not None:
        extra.append("choices: " + " | ".join(str(c) for c in s.choices))
    if s.identity:
        extra.append("fixed for --resume")
    return s.doc + (f" [{'; '.join(extra)}]" if extra else "")


DEFAULT_HEADER = """\
# DiffuMatting trainer: every key with its default (generated from training/config.py:
#   python train.py --print-default-config > configs/default.toml).
# Copy this file, change what you need, and run   python train.py --config my.toml
# Any key can also be set on the command line: --set SECTION.KEY=VALUE (e.g. --set loss.green=0.2).
# Precedence: defaults < --preset < --config < flags and --set.
"""


def to_toml(cfg: TrainConfig, comments: bool = False) -> str:
    """The config as TOML (written to <out>/config.toml at the start of a run); with the docs as comments."""
    lines = []
    table = spec_map()
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for name, v in values.items():
            line = f"{name} = {_toml_value(v)}"
            if comments:
                line = f"{line:<32} # {_comment(table[f'{section}.{name}'])}"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def default_toml() -> str:
    """The text of configs/default.toml: every key, its default and its documentation."""
    return DEFAULT_HEADER + "\n" + to_toml(TrainConfig(), comments=True)
