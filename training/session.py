"""What the stages share: the device, the models loaded once, the data items and composers, the text and
latent caches. A stage borrows these; it owns only its trainable modules and optimizer.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..models.atomic import atomic_path
from . import config
from .data import Composer, StepData, cache_key, scan_folder, synthetic_items
from .distributed import Dist
from .host import import_comfy
from .text import TextEncoder

HOLDOUT_OFFSET = 10_000_000   # holdout samples are composed with indices from here (never a training index)


class TrainError(RuntimeError):
    """The run cannot go on (a non-finite loss, a file that is not a checkpoint ...); the message says why."""


def seed_of(*parts) -> int:
    """A 32-bit seed that is a pure function of the integer parts."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def default_phrase() -> str:
    from ..models.prompting import DEFAULT_GREEN_PHRASE

    return DEFAULT_GREEN_PHRASE


def pick_device(pref: str, dist: Dist) -> torch.device:
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise config.ConfigError(f"run.device {pref!r} but this machine has no CUDA GPU that torch can use "
                                 f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch")
    if dist.enabled:
        return torch.device("cuda", dist.local_rank)
    if pref.startswith("cuda:") and int(pref[5:]) >= torch.cuda.device_count():
        raise config.ConfigError(f"run.device {pref!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                                 f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(pref if pref.startswith("cuda:") else "cuda")


def pick_amp_dtype(mode: str, device: torch.device):
    if device.type != "cuda" or mode == "no":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]


class Session:
    """Models, data and caches shared by the stages of one run."""

    def __init__(self, cfg: config.TrainConfig, dist: Dist, log=None):
        self.cfg = cfg
        self.dist = dist
        self.out = Path(cfg.run.out)
        self._print = log or (lambda *a: print(*a, flush=True))
        self.device = pick_device(cfg.run.device, dist)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.amp_dtype = pick_amp_dtype(cfg.run.mixed_precision, self.device)
        self.phrase = cfg.unet.phrase or default_phrase()
        self._latent_mem: dict = {}
        self.bad_files: list[str] = []
        self.runtime_bad: dict = {}

    def log(self, *msg):
        if self.dist.is_main:
            self._print(*msg)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    # ------------------------------------------------------------------ models
    def checkpoint_path(self) -> Path:
        if not self.cfg.model.tiny:
            return Path(self.cfg.model.checkpoint)
        path = self.out / f"tiny_sd15_seed{self.cfg.model.tiny_seed}.safetensors"
        if self.dist.is_main and not path.is_file():
            from .tiny_checkpoint import build_tiny_sd15_checkpoint

            self.log(f"building the tiny SD1.5-shaped checkpoint {path}")
            build_tiny_sd15_checkpoint(path, seed=self.cfg.model.tiny_seed)
        self.dist.barrier()
        return path

    def load_models(self):
        comfy_sd = import_comfy(self.cfg.run.comfyui or None, cpu=self.device.type == "cpu")
        import comfy.model_base

        path = self.checkpoint_path()
        t0 = time.time()
        try:
            patcher, clip, vae, _ = comfy_sd.load_checkpoint_guess_config(
                str(path), output_vae=True, output_clip=True, model_options={"dtype": torch.float32})
        except RuntimeError as e:
            raise config.ConfigError(f"model.checkpoint {str(path)!r} could not be loaded as a Stable Diffusion "
                                     f"checkpoint ({e}); pass an SD1.x/SD2/SDXL .safetensors file") from None
        if patcher is None or clip is None or vae is None:
            raise config.ConfigError(f"model.checkpoint {str(path)!r} lacks a UNet, text encoder or VAE: the trainer "
                                     f"needs a full SD1.x/SD2/SDXL checkpoint")
        self.base = patcher.model
        self.clip = clip
        self.vae = vae
        self.unet = self.base.diffusion_model
        self.fsm = vae.first_stage_model
        self.latent_format = self.base.latent_format
        name = type(self.base.model_config).__name__.lower()
        self.family = "sdxl" if "sdxl" in name or isinstance(self.base, getattr(comfy.model_base, "SDXL", ())) else (
            "sd2" if name.startswith("sd2") else "sd1")
        self.vae_family = "sdxl" if self.family == "sdxl" else "sd1"
        mt = getattr(self.base.model_type, "name", str(self.base.model_type))
        native = {"EPS": "eps", "V_PREDICTION": "v"}.get(mt)
        pred = self.cfg.model.prediction
        if pred == "auto":
            if native is None:
                raise config.ConfigError(f"the checkpoint predicts {mt}; the trainer handles eps and v models "
                                         f"(SD1.x/SD2/SDXL); set model.prediction explicitly if it is one of them")
            pred = native
        self.prediction = pred
        sig = self.base.model_sampling.sigmas.float().cpu()
        self.alphas_cumprod = 1.0 / (1.0 + sig ** 2)
        self.unet.requires_grad_(False)        # moved to the device by the UNet stage (a head-only run leaves it)
        self.fsm.to(self.device).requires_grad_(False).eval()
        self.vae_dtype = next(self.fsm.parameters()).dtype
        st = path.stat()
        self.vae_id = f"{path.name}:{st.st_size}:{st.st_mtime_ns}:{self.vae_dtype}"
        self.text = TextEncoder(clip, self.phrase, self.cfg.loss.green_tokens)
        self.log(f"loaded {path.name} ({self.family}, {self.prediction}-prediction) in {time.time() - t0:.1f}s "
                 f"on {self.device}{'' if self.amp_dtype is None else f', autocast {self.amp_dtype}'}")

    # ------------------------------------------------------------------ data
    def build_items(self):
        d = self.cfg.data
        if d.source == "synthetic":
            train = synthetic_items(d.synthetic_count, self.cfg.run.seed)
            hold = synthetic_items(d.holdout, self.cfg.run.seed, offset=HOLDOUT_OFFSET)
        else:
            try:
                items, bad = scan_folder(d.path, d.layout, d.caption_template, log=self.log, foreground=d.foreground)
            except ValueError as e:
                raise config.ConfigError(f"data.path: {e}") from None
            self.bad_files = bad
            hold = items[len(items) - d.holdout:] if 0 < d.holdout < len(items) else []
            train = items[: len(items) - len(hold)]
        self.train_items, self.hold_items = train, hold
        scale = (d.scale_min, d.scale_max)
        self.composers = {
            "unet": Composer(d.resolution, self.cfg.run.seed, scale, d.flip, d.unet_realism, key=tuple(d.key_color)),
            "head": Composer(d.resolution, self.cfg.run.seed, scale, d.flip, d.head_realism,
                             key=tuple(d.key_color) if d.head_key == "fixed" else None),
        }
        self.log(f"data: {len(train)} training and {len(hold)} held-out samples ({d.source})")

    def step_data(self, stage: str, batch: int, variants: int | None) -> StepData:
        return StepData(self.train_items, self.composers[stage], self.cfg.run.seed, batch, self.dist.rank,
                        self.dist.world, variants=variants, log=self._print)

    def holdout_samples(self, stage: str) -> list:
        comp = self.composers[stage]
        return [comp(it, HOLDOUT_OFFSET + i, 0) for i, it in enumerate(self.hold_items)]

    # ------------------------------------------------------------------ text
    def conditioning(self, captions: list[str]):
        """(cond (B,T,C), adm y or None, green indicator (B,T), has-green (B,)) on the device."""
        from .attention import green_indicator

        enc = [self.text(c) for c in captions]
        conds = [e[0] for e in enc]
        t = max(c.shape[1] for c in conds)
        if any(c.shape[1] != t for c in conds):   # long prompts: pad with the empty prompt's tokens
            empty = self.text("")[0]
            conds = [torch.cat([c] + [empty] * ((t - c.shape[1]) // empty.shape[1]), dim=1) for c in conds]
        cond = torch.cat(conds).to(self.device)
        y = None
        if getattr(self.base, "adm_channels", 0):
            r = self.cfg.data.resolution
            y = torch.cat([self.base.encode_adm(pooled_output=e[1], width=r, height=r, crop_w=0, crop_h=0,
                                                target_width=r, target_height=r) for e in enc]).to(self.device)
        ind, has = green_indicator([e[2] for e in enc], len(enc), cond.shape[1], device=self.device)
        return cond, y, ind, has

    # ------------------------------------------------------------------ latents
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> model-space latents (B,4,h,w), float32."""
        z = self.fsm.encode((images * 2 - 1).to(self.device, self.vae_dtype))
        return self.latent_format.process_in(z.float())

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> (B,3,H,W) images in [0,1], float32."""
        img = self.fsm.decode(self.latent_format.process_out(z).to(self.vae_dtype)).float()
        return ((img + 1) / 2).clamp(0, 1)

    def cache_dir(self) -> Path:
        return Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else self.out / "cache" / "latents"

    def _cache_lookup(self, idx: int, variant: int):
        """A cached latent, or the cache key to store it under."""
        comp = self.composers["unet"]
        ident = f"{self.vae_id}|realism={comp.realism}|key={comp.key}"
        key = cache_key(self.train_items[idx], variant, self.cfg.data.resolution, self.cfg.run.seed, ident)
        if key in self._latent_mem:
            return self._latent_mem[key]
        path = self.cache_dir() / f"{key}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            try:
                z = load_file(str(path))["latent"]
                self._latent_mem[key] = z
                return z
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
                pass
        return key

    def batch_latents(self, batch, use_cache: bool) -> torch.Tensor:
        """Latents (B,4,h,w) on the device of a batch of (Sample, item index, variant)."""
        latents = [None] * len(batch)
        todo = []
        for i, (_, idx, var) in enumerate(batch):
            got = self._cache_lookup(idx, var) if use_cache else None
            if isinstance(got, torch.Tensor):
                latents[i] = got
            else:
                todo.append((i, got))
        if todo:
            imgs = torch.stack([torch.from_numpy(batch[i][0].image).permute(2, 0, 1) for i, _ in todo])
            z = self.encode_images(imgs).cpu()
            for (i, ckey), zi in zip(todo, z):
                latents[i] = zi
                if use_cache and ckey:
                    self._latent_mem[ckey] = zi
                    if self.dist.is_main:
                        from safetensors.torch import save_file

                        with atomic_path(self.cache_dir() / f"{ckey}.safetensors") as tmp:
                            save_file({"latent": zi.contiguous()}, str(tmp))
        return torch.stack(latents).to(self.device)

    def bad_samples(self) -> list[str]:
        return list(self.bad_files) + list(self.runtime_bad.values())
