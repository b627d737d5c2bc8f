"""The DiffuMatting trainer: UNet stage (full or LoRA) with the paper's losses, then the matting head.

Everything random is a pure function of (run.seed, stage, step, sample position): the data order, the
augmentations, the noise, the timesteps and caption dropout. A checkpoint therefore only needs the
weights, the optimizer state and the step to continue exactly; torchrun ranks each compute their own
share of the same global batch.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import losses as L
from ..models.atomic import atomic_path
from ..models.matting_head import FeatureTaps, HeadConfig, MattingHead, save_head
from ..models.matting_losses import matting_loss
from . import config as C
from . import state as S
from .attention import GreenAttentionCapture, green_indicator, select_blocks
from .data import Composer, StepData, cache_key, global_positions, scan_folder, synthetic_items
from .distributed import Dist
from .host import import_comfy

UNET_FILE = "diffumatting_unet.safetensors"
LORA_FILE = "diffumatting_lora.safetensors"
HEAD_FILE = "diffumatting_head.safetensors"
UNET_FORMAT_VERSION = 1
EVAL_TIMESTEPS = (300, 600)
CSV_FIELDS = ["time", "stage", "step", "lr", "loss", "diffusion", "green", "detail", "l1", "grad", "comp", "bce"]


def _seed_of(*parts) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _default_phrase() -> str:
    from ..models.prompting import DEFAULT_GREEN_PHRASE

    return DEFAULT_GREEN_PHRASE


class Interrupt:
    """First Ctrl-C: finish the current step, write a checkpoint, exit. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)
        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:   # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class UnetModule(nn.Module):
    """What DistributedDataParallel wraps: the UNet plus (LoRA mode) its adapters."""

    def __init__(self, unet: nn.Module, lora: nn.Module | None):
        super().__init__()
        self.unet = unet
        self.lora = lora

    def forward(self, x, t, context, y=None, transformer_options=None):
        kw = {"y": y} if y is not None else {}
        return self.unet(x, timesteps=t, context=context, transformer_options=transformer_options or {}, **kw)


def enable_gradient_checkpointing(unet: nn.Module) -> int:
    """Recompute each ResBlock / SpatialTransformer in the backward pass (non-reentrant checkpoints).

    transformer_options dicts are copied per call so the recomputation sees the block key of the first
    pass (ComfyUI mutates that dict as the forward proceeds).
    """
    from torch.utils.checkpoint import checkpoint

    n = 0
    for m in unet.modules():
        if type(m).__name__ in ("ResBlock", "SpatialTransformer") and not getattr(m, "_dm_ckpt", False):
            orig = m.forward

            def fwd(*args, _orig=orig, **kw):
                args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                kw = {k: dict(v) if isinstance(v, dict) else v for k, v in kw.items()}
                if not torch.is_grad_enabled():
                    return _orig(*args, **kw)
                return checkpoint(_orig, *args, use_reentrant=False, **kw)

            m.forward = fwd
            m._dm_ckpt = True
            n += 1
    return n


def make_adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (CPU and CUDA) when this torch has it, else the foreach one."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


class Trainer:
    def __init__(self, cfg: C.TrainConfig, dist: Dist, resume: str | None = None, log=None,
                 stop_after: int | None = None):
        self.cfg = cfg
        self.stop_after = stop_after
        self.session_steps = 0
        self.stopped_early = False
        self.dist = dist
        self.out = Path(cfg.run.out)
        self.ckpt_root = self.out / "checkpoints"
        self._print = log or (lambda *a: print(*a, flush=True))
        self.resume_path = resume
        self.interrupt = Interrupt()
        self.measures: dict = {}
        self.final_losses: dict = {}
        self.device = self._device()
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.amp_dtype = self._amp_dtype()
        self.phrase = cfg.unet.phrase or _default_phrase()
        self._text_cache: OrderedDict = OrderedDict()
        self._latent_mem: dict = {}
        self._feature_mem: dict = {}

    # ------------------------------------------------------------------ setup
    def log(self, *msg):
        if self.dist.is_main:
            self._print(*msg)

    def _device(self) -> torch.device:
        pref = self.cfg.run.device
        if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise C.ConfigError(f"run.device {pref!r} but CUDA is not available; use --device cpu")
        if self.dist.enabled:
            return torch.device("cuda", self.dist.local_rank)
        return torch.device(pref if pref.startswith("cuda:") else "cuda")

    def _amp_dtype(self):
        mp = self.cfg.run.mixed_precision
        if self.device.type != "cuda" or mp == "no":
            return None
        if mp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"fp16": torch.float16, "bf16": torch.bfloat16}[mp]

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
        patcher, clip, vae, _ = comfy_sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, model_options={"dtype": torch.float32})
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
                raise C.ConfigError(f"the checkpoint predicts {mt}; the trainer handles eps and v models "
                                    f"(SD1.x/SD2/SDXL); set model.prediction explicitly if it is one of them")
            pred = native
        self.prediction = pred
        sig = self.base.model_sampling.sigmas.float().cpu()
        self.alphas_cumprod = 1.0 / (1.0 + sig ** 2)
        self.unet.requires_grad_(False)        # moved to the device by setup_unet (a head-only run leaves it)
        self.fsm.to(self.device).requires_grad_(False).eval()
        self.vae_dtype = next(self.fsm.parameters()).dtype
        st = path.stat()
        self.vae_id = f"{path.name}:{st.st_size}:{st.st_mtime_ns}:{self.vae_dtype}"
        self.log(f"loaded {path.name} ({self.family}, {self.prediction}-prediction) in {time.time() - t0:.1f}s "
                 f"on {self.device}{'' if self.amp_dtype is None else f', autocast {self.amp_dtype}'}")

    # ------------------------------------------------------------------ data
    def build_items(self):
        d = self.cfg.data
        if d.source == "synthetic":
            train = synthetic_items(d.synthetic_count, self.cfg.run.seed)
            hold = synthetic_items(d.holdout, self.cfg.run.seed, offset=10_000_000)
            self.bad_files = []
        else:
            items, bad = scan_folder(d.path, d.layout, d.caption_template, log=self.log)
            self.bad_files = bad
            hold = items[len(items) - d.holdout:] if 0 < d.holdout < len(items) else []
            train = items[: len(items) - len(hold)]
        self.train_items, self.hold_items = train, hold
        self.composer = Composer(d.resolution, self.cfg.run.seed, (d.scale_min, d.scale_max), d.flip, d.realism)
        self.log(f"data: {len(train)} training and {len(hold)} held-out samples ({d.source})")

    def step_data(self, batch: int, variants: int | None) -> StepData:
        return StepData(self.train_items, self.composer, self.cfg.run.seed, batch, self.dist.rank, self.dist.world,
                        variants=variants, log=self._print)

    def holdout_samples(self):
        return [self.composer(it, 10_000_000 + i, 0) for i, it in enumerate(self.hold_items)]

    # ------------------------------------------------------------------ text
    def _token_ids(self, tokens) -> list[int]:
        chunks = tokens.get("l") or next(iter(tokens.values()))
        return [int(t[0]) for chunk in chunks for t in chunk]

    def green_ids(self) -> list[int]:
        if not hasattr(self, "_green_ids"):
            from ..models.prompting import GREEN_WORD, strip_special

            special = set(self._token_ids(self.clip.tokenize("")))
            self._green_ids = strip_special(self._token_ids(self.clip.tokenize(GREEN_WORD)), special)
        return self._green_ids

    def encode_text(self, text: str):
        """(cond (1,T,C), pooled or None, green positions) for one caption, LRU-cached on the CPU."""
        hit = self._text_cache.get(text)
        if hit is not None:
            self._text_cache.move_to_end(text)
            return hit
        from ..models.prompting import green_token_positions

        tokens = self.clip.tokenize(text)
        with torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        pos = green_token_positions(self._token_ids(tokens), self.green_ids()) if text else []
        hit = (cond.float().cpu(), None if pooled is None else pooled.float().cpu(), pos)
        self._text_cache[text] = hit
        if len(self._text_cache) > 4096:
            self._text_cache.popitem(last=False)
        return hit

    def conditioning(self, captions: list[str]):
        enc = [self.encode_text(c) for c in captions]
        conds = [e[0] for e in enc]
        t = max(c.shape[1] for c in conds)
        if any(c.shape[1] != t for c in conds):   # long prompts: pad with the empty prompt's tokens
            empty = self.encode_text("")[0]
            conds = [torch.cat([c] + [empty] * ((t - c.shape[1]) // empty.shape[1]), dim=1) for c in conds]
        cond = torch.cat(conds).to(self.device)
        y = None
        if getattr(self.base, "adm_channels", 0):
            r = self.cfg.data.resolution
            y = torch.cat([self.base.encode_adm(pooled_output=e[1], width=r, height=r, crop_w=0, crop_h=0,
                                                target_width=r, target_height=r) for e in enc]).to(self.device)
        ind, has = green_indicator([e[2] for e in enc], len(enc), cond.shape[1], device=self.device)
        return cond, y, ind, has

    # ------------------------------------------------------------------ tensors
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> model-space latents (B,4,h,w), float32."""
        z = self.fsm.encode((images * 2 - 1).to(self.device, self.vae_dtype))
        return self.latent_format.process_in(z.float())

    def sample_latent(self, sample, idx: int, variant: int, use_cache: bool) -> torch.Tensor:
        if not use_cache:
            return None
        key = cache_key(self.train_items[idx], variant, self.cfg.data.resolution, self.cfg.run.seed, self.vae_id)
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
        latents = [None] * len(batch)
        todo = []
        for i, (s, idx, var) in enumerate(batch):
            got = self.sample_latent(s, idx, var, use_cache)
            if isinstance(got, torch.Tensor):
                latents[i] = got
            else:
                todo.append((i, got))
        if todo:
            imgs = torch.stack([torch.from_numpy(batch[i][0].image).permute(2, 0, 1) for i, _ in todo])
            z = self.encode_images(imgs).cpu()
            for (i, key), zi in zip(todo, z):
                latents[i] = zi
                if use_cache and key:
                    self._latent_mem[key] = zi
                    if self.dist.is_main:
                        from safetensors.torch import save_file

                        with atomic_path(self.cache_dir() / f"{key}.safetensors") as tmp:
                            save_file({"latent": zi.contiguous()}, str(tmp))
        return torch.stack(latents).to(self.device)

    def cache_dir(self) -> Path:
        return Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else self.out / "cache" / "latents"

    @staticmethod
    def _alpha(batch) -> torch.Tensor:
        return torch.stack([torch.from_numpy(s.alpha)[None] for s, _, _ in batch])

    # ------------------------------------------------------------------ UNet stage
    def setup_unet(self):
        u = self.cfg.unet
        self.unet.to(self.device)
        self.lora = None
        if u.mode == "lora":
            from .lora import LoraSet

            self.lora = LoraSet(self.unet, u.lora_targets, u.lora_rank, u.lora_alpha, seed=self.cfg.run.seed)
            self.lora.to(self.device).attach()
            params = list(self.lora.parameters())
        else:
            self.unet.requires_grad_(True)
            params = list(self.unet.parameters())
        gc = self.cfg.run.gradient_checkpointing
        if gc == "on" or (gc == "auto" and self.device.type == "cuda" and u.mode == "full"):
            n = enable_gradient_checkpointing(self.unet)
            self.log(f"gradient checkpointing on {n} blocks")
        self.module = UnetModule(self.unet, self.lora)
        self.ddp = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=self.cfg.run.ddp_find_unused)
        self.opt = make_adamw(params, u.lr, u.weight_decay)
        self.params = params
        lo = self.cfg.loss
        blocks = select_blocks(self.unet, lo.green_factors, tuple(lo.green_parts))
        self.capture = GreenAttentionCapture(blocks)
        self.log(f"green loss on {len(blocks)} cross-attention blocks: "
                 + ", ".join(f"{b.part}{b.index}(1/{b.factor})" for b in blocks))

    def unet_trainable_state(self) -> dict:
        if self.lora is not None:
            return {f"lora.{k}": v for k, v in self.lora.state_dict().items()}
        return {f"unet.{k}": v for k, v in self.unet.state_dict().items()}

    def load_unet_trainable(self, tensors: dict):
        if self.lora is not None:
            self.lora.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
        else:
            self.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})

    def per_sample_noise(self, stage: str, step: int, shape, positions) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(noise, timesteps, dropout flags), each sample seeded by its global position in the stream."""
        u = self.cfg.unet
        noises, ts, drops = [], [], []
        for p in positions:
            g = torch.Generator().manual_seed(_seed_of(self.cfg.run.seed, 0xD1FF, step, p))
            noises.append(torch.randn(shape, generator=g))
            ts.append(int(torch.randint(u.timestep_min, u.timestep_max, (1,), generator=g)))
            drops.append(bool(torch.rand((), generator=g) < self.cfg.data.caption_dropout))
        return torch.stack(noises), torch.tensor(ts), drops

    def unet_losses(self, x0, alpha, captions, noise, t, has_override=None, train=True):
        """Forward + the three losses; returns (total, parts dict of floats, model output)."""
        lo = self.cfg.loss
        cond, y, ind, has = self.conditioning(captions)
        ab = self.alphas_cumprod[t].to(self.device)
        noise = noise.to(self.device)
        x_t = L.add_noise(x0, noise, ab)
        want_green = lo.green > 0
        self.capture.set_tokens(ind if want_green else None)
        opts = self.capture.transformer_options() if want_green else {}
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = (self.ddp if train else self.module)(x_t, t.float().to(self.device), cond, y, opts)
        out = out.float()
        parts = {}
        target = L.diffusion_target(x0, noise, ab, self.prediction)
        total = lo.diffusion * L.diffusion_loss(out, target) if lo.diffusion > 0 else out.new_zeros(())
        parts["diffusion"] = L.diffusion_loss(out.detach(), target)
        if want_green:
            maps = self.capture.maps()
            lg = L.green_attention_loss(maps, alpha.to(self.device), tuple(x0.shape[-2:]), sample_weight=has)
            total = total + lo.green * lg
            parts["green"] = lg.detach()
        if lo.detail > 0:
            x0_hat = L.predicted_x0(x_t, out, ab, self.prediction)
            ld = L.detail_loss(x0_hat, x0, alpha.to(self.device), lo.detail_band_weight, sample_weight=ab.sqrt())
            total = total + lo.detail * ld
            parts["detail"] = ld.detach()
        self.capture.set_tokens(None)
        return total, parts

    def captions_with_phrase(self, batch, drops):
        from ..models.prompting import add_green_phrase

        return ["" if d else add_green_phrase(s.caption, self.phrase) for (s, _, _), d in zip(batch, drops)]

    def lr_at(self, step: int, base: float, warmup: int) -> float:
        return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base

    # ------------------------------------------------------------------ measures
    @torch.no_grad()
    def measure_green_iou(self) -> float:
        """Mean IoU at the median threshold between the green token's attention (averaged over the
        captured layers and heads) and the background, on the held-out samples at fixed timesteps."""
        samples = self.hold_samples
        if not samples:
            return float("nan")
        from ..models.prompting import add_green_phrase

        x0 = self.encode_images(torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in samples]))
        alpha = torch.stack([torch.from_numpy(s.alpha)[None] for s in samples]).to(self.device)
        cond, y, ind, has = self.conditioning([add_green_phrase(s.caption, self.phrase) for s in samples])
        scores = []
        for t_eval in EVAL_TIMESTEPS:
            g = torch.Generator().manual_seed(_seed_of(self.cfg.run.seed, 0xE7A1, t_eval))
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            t = torch.full((x0.shape[0],), t_eval)
            ab = self.alphas_cumprod[t].to(self.device)
            self.capture.set_tokens(ind)
            self.module(L.add_noise(x0, noise, ab), t.float().to(self.device), cond, y,
                        self.capture.transformer_options())
            maps = self.capture.maps()
            self.capture.set_tokens(None)
            hw = tuple(x0.shape[-2:])
            finest = max((L._map_hw(m, hw) for m in maps), key=lambda m: m.shape[-1])
            size = tuple(finest.shape[-2:])
            mean_map = torch.stack([F.interpolate(L._map_hw(m, hw), size=size, mode="bilinear", align_corners=False)
                                    for m in maps]).mean(0)
            scores.append(L.attention_iou(mean_map, alpha)[has > 0])
        return float(torch.cat(scores).mean())

    # ------------------------------------------------------------------ head stage
    def setup_head(self):
        h = self.cfg.head
        dec_sd = {f"decoder.{k}": v for k, v in self.fsm.decoder.state_dict().items()}
        self.head_config = HeadConfig.for_vae_state_dict(dec_sd, prefix="decoder.", coarse_levels=h.coarse_levels,
                                                         hidden=h.hidden)
        self.head = MattingHead(self.head_config).reset_parameters(self.cfg.run.seed).to(self.device)
        self.head_family = self.vae_family if h.vae_family == "auto" else h.vae_family
        self.head_ddp = self.head
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.head_ddp = DDP(self.head, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.head_opt = make_adamw(list(self.head.parameters()), h.lr, 0.0)

    @torch.no_grad()
    def decoder_features(self, images: torch.Tensor):
        """Decoder features (fine, [coarse...]) of the encoded images: what the head sees when decoding."""
        z = self.fsm.encode((images * 2 - 1).to(self.device, self.vae_dtype))
        with FeatureTaps(self.fsm.decoder, self.head_config.taps) as taps:
            self.fsm.decode(z)
        cfg = self.head_config
        return taps.features[cfg.fine_tap].float(), [taps.features[t].float() for t in cfg.coarse_taps]

    def head_batch(self, batch):
        use_cache = self.cfg.head.feature_cache
        fine, coarse = [None] * len(batch), [None] * len(batch)
        todo = []
        for i, (s, idx, var) in enumerate(batch):
            hit = self._feature_mem.get((idx, var)) if use_cache else None
            if hit is None:
                todo.append(i)
            else:
                fine[i], coarse[i] = hit
        if todo:
            imgs = torch.stack([torch.from_numpy(batch[i][0].image).permute(2, 0, 1) for i in todo])
            f, cs = self.decoder_features(imgs)
            for j, i in enumerate(todo):
                fine[i] = f[j:j + 1]
                coarse[i] = [c[j:j + 1] for c in cs]
                if use_cache:
                    s, idx, var = batch[i]
                    self._feature_mem[(idx, var)] = (fine[i].cpu(), [c.cpu() for c in coarse[i]])
        fine = torch.cat(fine).to(self.device)
        coarse = [torch.cat([c[k] for c in coarse]).to(self.device) for k in range(len(self.head_config.coarse_taps))]
        return fine, coarse

    @staticmethod
    def _chw(batch, attr):
        return torch.stack([torch.from_numpy(getattr(s, attr)).permute(2, 0, 1) for s, _, _ in batch])

    def head_losses(self, batch, train=True):
        h = self.cfg.head
        fine, coarse = self.head_batch(batch)
        pred = (self.head_ddp if train else self.head)(fine, coarse)
        alpha = self._alpha(batch).to(self.device)
        total, parts = matting_loss(pred, alpha, self._chw(batch, "foreground").to(self.device),
                                    self._chw(batch, "backing").to(self.device),
                                    self._chw(batch, "image").to(self.device), w_l1=h.w_l1, w_grad=h.w_grad,
                                    w_comp=h.w_comp)
        if h.w_bce > 0:
            bce = F.binary_cross_entropy(pred.float().clamp(1e-6, 1 - 1e-6), alpha.float())
            total = total + h.w_bce * bce
            parts["bce"] = float(bce.detach())
        return total, parts, pred

    def constant_alpha_error(self) -> float:
        """Held-out MAE of the best constant answer (the median alpha): what a collapsed head would score."""
        if not self.hold_samples:
            return float("nan")
        a = torch.stack([torch.from_numpy(s.alpha) for s in self.hold_samples])
        return float((a - a.median()).abs().mean())

    @torch.no_grad()
    def measure_head_error(self) -> float:
        """Mean absolute alpha error of the head on the held-out samples."""
        if not self.hold_samples:
            return float("nan")
        errs = []
        for i in range(0, len(self.hold_samples), 4):
            batch = [(s, -1 - i - j, 0) for j, s in enumerate(self.hold_samples[i:i + 4])]
            fine, coarse = self.head_batch(batch)
            pred = self.head(fine, coarse)
            errs.append((pred - self._alpha(batch).to(self.device)).abs().flatten(1).mean(1))
        return float(torch.cat(errs).mean())

    # ------------------------------------------------------------------ files
    def export_unet(self) -> Path:
        u = self.cfg.unet
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[u.save_dtype]
        meta = {"kind": "unet", "format_version": str(UNET_FORMAT_VERSION), "base_architecture": self.family,
                "phrase": self.phrase, "prediction": self.prediction, "trainer": "diffumatting train.py",
                "steps": str(u.steps), "green_weight": str(self.cfg.loss.green),
                "detail_weight": str(self.cfg.loss.detail)}
        if self.lora is not None:
            from .lora import export_kohya

            path = self.out / LORA_FILE
            meta["kind"] = "lora"
            export_kohya(path, self.lora, self.base, dtype=dtype, metadata=meta)
            return path
        from safetensors.torch import save_file

        path = self.out / UNET_FILE
        tensors = {f"diffusion_model.{k}": v.detach().to("cpu", dtype).contiguous()
                   for k, v in self.unet.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    def export_head(self) -> Path:
        return save_head(self.out / HEAD_FILE, self.head, self.head_family,
                         {"trainer": "diffumatting train.py", "steps": str(self.cfg.head.steps),
                          "base_checkpoint": self.checkpoint_path().name})

    def write_grid(self, name: str, rows: list[list[np.ndarray]]):
        if not self.dist.is_main or not rows:
            return
        from PIL import Image

        h, w = rows[0][0].shape[:2]
        cols = max(len(r) for r in rows)
        grid = np.ones((h * len(rows), w * cols, 3), np.float32)
        for i, r in enumerate(rows):
            for j, im in enumerate(r):
                im = im if im.ndim == 3 else np.repeat(im[..., None], 3, axis=2)
                grid[i * h:(i + 1) * h, j * w:(j + 1) * w] = im[:h, :w]
        path = self.out / "samples" / f"{name}.png"
        with atomic_path(path) as tmp:
            Image.fromarray((np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8)).save(tmp, format="PNG")

    @staticmethod
    def _over_checker(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
        h, w = a.shape
        yy, xx = np.mgrid[0:h, 0:w]
        cell = max(4, min(h, w) // 8)
        board = np.where(((yy // cell + xx // cell) % 2) == 0, 0.8, 0.6).astype(np.float32)[..., None]
        return rgb * a[..., None] + board * (1 - a[..., None])

    @torch.no_grad()
    def unet_sample_grid(self, step: int):
        """Generated images (DDIM) and a simple green-key alpha over a checkerboard."""
        if not self.dist.is_main:
            return
        r = self.cfg.run
        from ..models.prompting import add_green_phrase

        caps = [add_green_phrase((self.hold_items or self.train_items)[i % len(self.hold_items or self.train_items)]
                                 .caption, self.phrase) for i in range(r.sample_count)]
        cond, y, _, _ = self.conditioning(caps)
        uncond, uy, _, _ = self.conditioning([""] * len(caps))
        lat = self.cfg.data.resolution // 8
        g = torch.Generator().manual_seed(_seed_of(self.cfg.run.seed, 0x5A3E))
        x = torch.randn((len(caps), 4, lat, lat), generator=g).to(self.device)
        ts = torch.linspace(999, 0, r.sample_steps).round().long()
        acp = self.alphas_cumprod
        for i, t in enumerate(ts):
            ab = acp[t].to(self.device)
            ab_prev = acp[ts[i + 1]].to(self.device) if i + 1 < len(ts) else torch.tensor(1.0, device=self.device)
            tt = torch.full((2 * len(caps),), float(t), device=self.device)
            yy = None if y is None else torch.cat([y, uy])
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.module(torch.cat([x, x]), tt, torch.cat([cond, uncond]), yy, {}).float()
            oc, ou = out.chunk(2)
            o = ou + r.sample_cfg * (oc - ou)
            if self.prediction == "eps":
                eps, x0 = o, (x - (1 - ab).sqrt() * o) / ab.sqrt()
            else:
                x0, eps = ab.sqrt() * x - (1 - ab).sqrt() * o, (1 - ab).sqrt() * x + ab.sqrt() * o
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        img = self.fsm.decode(self.latent_format.process_out(x).to(self.vae_dtype)).float()
        img = ((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        rows = []
        for im in img:
            greenness = im[..., 1] - np.maximum(im[..., 0], im[..., 2])
            a = 1.0 - np.clip(greenness / 0.15, 0, 1)
            rows.append([im, a, self._over_checker(im, a)])
        self.write_grid(f"unet-{step:07d}", rows)

    @torch.no_grad()
    def head_sample_grid(self, step: int):
        if not self.dist.is_main or not self.hold_samples:
            return
        samples = self.hold_samples[: self.cfg.run.sample_count]
        batch = [(s, -1 - j, 0) for j, s in enumerate(samples)]
        fine, coarse = self.head_batch(batch)
        pred = self.head(fine, coarse)[:, 0].cpu().numpy()
        rows = [[s.image, a, self._over_checker(s.image, a), s.alpha] for s, a in zip(samples, pred)]
        self.write_grid(f"head-{step:07d}", rows)

    # ------------------------------------------------------------------ run
    def csv_log(self, row: dict):
        if not self.dist.is_main:
            return
        path = self.out / "log.csv"
        new = not path.is_file()
        with open(path, "a", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in CSV_FIELDS})

    def truncate_csv(self, stage: str, step: int):
        """On resume: drop log rows written after the checkpoint (they will be written again)."""
        path = self.out / "log.csv"
        if not self.dist.is_main or not path.is_file():
            return
        order = S.STAGE_ORDER[stage]
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        keep = [r for r in rows if (S.STAGE_ORDER.get(r["stage"], 9), int(r["step"])) <= (order, step)]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
                w.writeheader()
                w.writerows(keep)

    def save(self, stage: str, step: int, done: bool):
        if stage == "unet":
            tensors, opt = self.unet_trainable_state(), self.opt
        else:
            tensors, opt = {f"head.{k}": v for k, v in self.head.state_dict().items()}, self.head_opt
        state = {"done": done, "measures": self.measures, "final_losses": self.final_losses,
                 "config": self.cfg.to_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}
        if self.dist.is_main:
            path = S.save_checkpoint(self.ckpt_root, stage, step, tensors, opt, state, self.cfg.run.keep_checkpoints)
            self.log(f"checkpoint {path}")
        self.dist.barrier()

    def _progress(self, stage: str, start: int, total: int):
        if not (self.dist.is_main and self.cfg.run.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True, file=sys.stderr)

    def run_stage(self, stage: str, resume_state: tuple | None):
        cfg = self.cfg
        sc = cfg.unet if stage == "unet" else cfg.head
        if stage == "unet":
            self.setup_unet()
        else:
            self.setup_head()
        params_opt = self.opt if stage == "unet" else self.head_opt
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        start = 0
        if resume_state is not None:
            mt, ot, st = resume_state
            if stage == "unet":
                self.load_unet_trainable(mt)
            else:
                self.head.load_state_dict({k[5:]: v.to(self.device) for k, v in mt.items() if k.startswith("head.")})
            S.load_optimizer(params_opt, {k: v for k, v in ot.items() if not k.startswith("rng.")}, st["optimizer"])
            S.restore_rng(ot)
            if self.scaler is not None and st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
            start = int(st["step"])
            self.log(f"resumed {stage} at step {start}")
        key_before = "green_iou_before" if stage == "unet" else "head_error_before"
        if stage == "head" and self.dist.is_main:
            self.measures["head_error_constant"] = self.constant_alpha_error()
        if key_before not in self.measures and self.dist.is_main:
            self.measures[key_before] = self.measure_green_iou() if stage == "unet" else self.measure_head_error()
            self.log(f"{key_before} = {self.measures[key_before]:.4f}")
        variants = cfg.data.cache_variants if (stage == "unet" and cfg.data.cache_latents) or (
            stage == "head" and cfg.head.feature_cache) else None
        data = self.step_data(sc.batch_size, variants)
        bar = self._progress(stage, start, sc.steps)
        recent: dict[str, list] = {}
        step = start
        interrupted = False
        t0 = time.time()
        if self.stop_after is not None and self.session_steps >= self.stop_after and step < sc.steps:
            self.stopped_early = True      # the previous stage used up this session's steps
            return False
        while step < sc.steps:
            lr = self.lr_at(step, sc.lr, sc.warmup)
            for g in params_opt.param_groups:
                g["lr"] = lr
            batch = data.batch(step)
            if stage == "unet":
                positions = list(global_positions(step, sc.batch_size, self.dist.rank, self.dist.world))
                x0 = self.batch_latents(batch, cfg.data.cache_latents)
                noise, t, drops = self.per_sample_noise(stage, step, x0.shape[1:], positions)
                total, parts = self.unet_losses(x0, self._alpha(batch), self.captions_with_phrase(batch, drops),
                                                noise, t)
            else:
                total, parts, _ = self.head_losses(batch)
                parts = {k: torch.tensor(v) for k, v in parts.items()}
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.unscale_(params_opt)
            else:
                total.backward()
            if sc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in params_opt.param_groups for p in g["params"]],
                                               sc.grad_clip)
            if self.scaler is not None:
                self.scaler.step(params_opt)
                self.scaler.update()
            else:
                params_opt.step()
            params_opt.zero_grad(set_to_none=True)
            step += 1
            names = ["loss", *parts.keys()]
            vals = self.dist.mean([float(total.detach()), *[float(v) for v in parts.values()]])
            row = dict(zip(names, vals))
            for k, v in row.items():
                recent.setdefault(k, []).append(v)
                recent[k] = recent[k][-20:]
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in row.items()}, refresh=False)
            if step % cfg.run.log_every == 0 or step == sc.steps:
                self.csv_log({"time": round(time.time() - t0, 3), "stage": stage, "step": step, "lr": lr, **row})
            if cfg.run.sample_every and step % cfg.run.sample_every == 0 and step < sc.steps:
                (self.unet_sample_grid if stage == "unet" else self.head_sample_grid)(step)
                self.dist.barrier()
            self.session_steps += 1
            limit = self.stop_after is not None and self.session_steps >= self.stop_after and step < sc.steps
            self.stopped_early = self.stopped_early or limit
            stop = self.dist.any_flag(self.interrupt.requested or limit)
            if stop or step % cfg.run.checkpoint_every == 0 or step == sc.steps:
                self.final_losses[stage] = {k: float(np.mean(v)) for k, v in recent.items()}
                if step < sc.steps:
                    self.save(stage, step, done=False)
            if stop:
                interrupted = True
                break
        if bar is not None:
            bar.close()
        self.runtime_bad.update(data.bad)
        if interrupted:
            return False
        if recent:
            self.final_losses[stage] = {k: float(np.mean(v)) for k, v in recent.items()}
        key_after = "green_iou_after" if stage == "unet" else "head_error_after"
        if self.dist.is_main:
            self.measures[key_after] = self.measure_green_iou() if stage == "unet" else self.measure_head_error()
            self.log(f"{key_after} = {self.measures[key_after]:.4f}")
            path = self.export_unet() if stage == "unet" else self.export_head()
            self.log(f"wrote {path}")
            self.files[stage] = str(path)
            (self.unet_sample_grid if stage == "unet" else self.head_sample_grid)(step)
        self.save(stage, step, done=True)
        self.teardown_stage(stage)
        return True

    def teardown_stage(self, stage: str):
        if stage == "unet":
            if self.lora is not None:
                self.lora.detach()
            self.ddp = self.module = None
            self.opt = None
            self.unet.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            self.head_ddp = None

    def resume_point(self):
        """(stage -> (tensors, opt tensors, state)) for the stage to continue, and the stages already done."""
        if not self.resume_path:
            return None, []
        path = S.latest_checkpoint(self.ckpt_root) if self.resume_path == "auto" else Path(self.resume_path)
        if path is None:
            raise C.ConfigError(f"--resume: no checkpoint in {self.ckpt_root}; start without --resume")
        mt, ot, st = S.read_checkpoint(path)
        old = C.from_dict(st["config"])
        changed = C.changed_identity(old, self.cfg)
        if changed:
            raise C.ConfigError(f"--resume {path.name}: these settings differ from the run being resumed and would "
                                f"change its data or model: {', '.join(changed)}; resume with the same values "
                                f"(or start a new run in another --out)")
        self.measures = dict(st.get("measures") or {})
        self.final_losses = dict(st.get("final_losses") or {})
        stage, step = st["stage"], int(st["step"])
        stages = self.cfg.run.stages
        done = [s for s in stages if S.STAGE_ORDER[s] < S.STAGE_ORDER[stage]]
        if st.get("done"):
            done.append(stage)
            self.truncate_csv(stage, step)
            return None, done
        self.truncate_csv(stage, step)
        return (stage, (mt, ot, st)), done

    def bad_samples(self) -> list[str]:
        return list(self.bad_files) + list(self.runtime_bad.values())

    def write_summary(self, complete: bool):
        if not self.dist.is_main:
            return
        summary = {"complete": complete, "measures": self.measures, "final_losses": self.final_losses,
                   "files": self.files, "bad_samples": self.bad_samples()}
        with atomic_path(self.out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")

    def run(self) -> int:
        """Run the configured stages; returns the process exit code (0 done, 130 interrupted)."""
        cfg = self.cfg
        self.files: dict = {}
        self.runtime_bad: dict = {}
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "config.toml") as tmp:
                tmp.write_text(C.to_toml(cfg), encoding="utf-8")
        self.dist.barrier()
        resume, done = self.resume_point()
        self.load_models()
        self.build_items()
        self.hold_samples = self.holdout_samples()
        with self.interrupt:
            for stage in cfg.run.stages:
                if stage in done:
                    self.log(f"stage {stage}: already complete in the checkpoint")
                    continue
                rs = resume[1] if resume is not None and resume[0] == stage else None
                ok = self.run_stage(stage, rs)
                if not ok:
                    self.write_summary(complete=False)
                    if self.stopped_early and not self.interrupt.requested:
                        self.log(f"stopped after {self.session_steps} steps (--stop-after); checkpoint written; "
                                 f"continue with --resume")
                        return 0
                    self.log("interrupted: checkpoint written; continue with --resume")
                    return 130
        self.write_summary(complete=True)
        self.print_final()
        return 0

    def print_final(self):
        if not self.dist.is_main:
            return
        lines = []
        for stage, vals in self.final_losses.items():
            lines.append(f"final {stage} losses: " + " ".join(f"{k}={v:.4f}" for k, v in vals.items()))
        m = self.measures
        if "green_iou_before" in m or "green_iou_after" in m:
            lines.append(f"green attention IoU (held-out, median threshold): before={m.get('green_iou_before', float('nan')):.4f} "
                         f"after={m.get('green_iou_after', float('nan')):.4f}")
        if "head_error_before" in m or "head_error_after" in m:
            lines.append(f"head alpha error (held-out MAE): before={m.get('head_error_before', float('nan')):.4f} "
                         f"after={m.get('head_error_after', float('nan')):.4f} "
                         f"(best constant answer: {m.get('head_error_constant', float('nan')):.4f})")
        bad = self.bad_samples()
        lines.append(f"bad samples skipped: {len(bad)}")
        for line in lines:
            self._print(line)
