"""The UNet stage: a full or LoRA fine-tune with the diffusion, green-background and detail losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import losses
from ..models.atomic import atomic_path
from . import config
from .attention import GreenAttentionCapture, select_blocks
from .data import global_positions
from .report import over_checker, write_grid
from .session import seed_of
from .stage import Stage, make_adamw

UNET_FILE = "diffumatting_unet.safetensors"
LORA_FILE = "diffumatting_lora.safetensors"
UNET_FORMAT_VERSION = 1
EVAL_TIMESTEPS = (300, 600)     # green IoU: attention read at these noise levels
EDGE_TIMESTEP = 200             # edge sharpness: x0 predicted from this (low) noise level


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
    pass (ComfyUI mutates that dict as the forward proceeds). The green capture binds its indicator into
    those options (training/attention.py), so the recomputation takes the same attention path.
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


def edge_band(alpha: torch.Tensor, width: int) -> torch.Tensor:
    """(B,1,H,W) bool: pixels within `width` of the object's edge (where the box-averaged alpha is mixed)."""
    k = 2 * width + 1
    avg = F.avg_pool2d(alpha.float(), k, stride=1, padding=width, count_include_pad=False)
    return (avg > 0.02) & (avg < 0.98)


def mean_edge_gradient(images: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """(B,) mean Sobel magnitude of the luma of (B,3,H,W) images inside `band`."""
    luma = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)
    mag = losses.sobel_magnitude(luma)
    w = band.float()
    return (mag * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)


class UnetStage(Stage):
    name = "unet"

    def __init__(self, session):
        super().__init__(session)
        self.lora = None
        self.module = self.ddp = None
        self.capture = None
        self.holdout = session.holdout_samples("unet")

    def variants(self):
        return self.cfg.data.cache_variants if self.cfg.data.cache_latents else None

    # ------------------------------------------------------------------ setup
    def setup(self):
        s, u = self.s, self.cfg.unet
        unet = s.unet
        unet.to(s.device)
        if u.mode == "lora":
            from .lora import LoraSet

            try:
                self.lora = LoraSet(unet, u.lora_targets, u.lora_rank, u.lora_alpha, seed=self.cfg.run.seed)
            except ValueError as e:
                raise config.ConfigError(str(e)) from None
            self.lora.to(s.device).attach()
            self.params = list(self.lora.parameters())
        else:
            unet.requires_grad_(True)
            self.params = list(unet.parameters())
        gc = self.cfg.run.gradient_checkpointing
        if gc == "on" or (gc == "auto" and s.device.type == "cuda" and u.mode == "full"):
            n = enable_gradient_checkpointing(unet)
            s.log(f"gradient checkpointing on {n} blocks")
        self.module = UnetModule(unet, self.lora)
        self.ddp = self.module
        if s.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.module, device_ids=[s.device.index] if s.device.type == "cuda" else None,
                           find_unused_parameters=self.cfg.run.ddp_find_unused)
        self.optimizer = make_adamw(self.params, u.lr, u.weight_decay)
        lo = self.cfg.loss
        try:
            blocks = select_blocks(unet, lo.green_factors, tuple(lo.green_parts))
        except ValueError as e:
            raise config.ConfigError(str(e)) from None
        self.capture = GreenAttentionCapture(blocks)
        s.log(f"green loss on {len(blocks)} cross-attention blocks: "
              + ", ".join(f"{b.part}{b.index}(1/{b.factor})" for b in blocks))

    def trainable_state(self) -> dict:
        if self.lora is not None:
            return {f"lora.{k}": v for k, v in self.lora.state_dict().items()}
        return {f"unet.{k}": v for k, v in self.s.unet.state_dict().items()}

    def load_trainable(self, tensors: dict):
        if self.lora is not None:
            self.lora.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
        else:
            self.s.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})

    # ------------------------------------------------------------------ step
    def per_sample_noise(self, step: int, shape, positions) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(noise, timesteps, dropout flags), each sample seeded by its global position in the stream."""
        u = self.cfg.unet
        noises, ts, drops = [], [], []
        for p in positions:
            g = torch.Generator().manual_seed(seed_of(self.cfg.run.seed, 0xD1FF, step, p))
            noises.append(torch.randn(shape, generator=g))
            ts.append(int(torch.randint(u.timestep_min, u.timestep_max, (1,), generator=g)))
            drops.append(bool(torch.rand((), generator=g) < self.cfg.data.caption_dropout))
        return torch.stack(noises), torch.tensor(ts), drops

    def captions_with_phrase(self, batch, drops):
        from ..models.prompting import add_green_phrase

        return ["" if d else add_green_phrase(s.caption, self.s.phrase) for (s, _, _), d in zip(batch, drops)]

    @staticmethod
    def alpha_of(batch) -> torch.Tensor:
        return torch.stack([torch.from_numpy(s.alpha)[None] for s, _, _ in batch])

    def step(self, step: int, batch: list):
        s = self.s
        positions = list(global_positions(step, self.cfg.unet.batch_size, s.dist.rank, s.dist.world))
        x0 = s.batch_latents(batch, self.cfg.data.cache_latents)
        noise, t, drops = self.per_sample_noise(step, x0.shape[1:], positions)
        return self.losses(x0, self.alpha_of(batch), self.captions_with_phrase(batch, drops), noise, t)

    def losses(self, x0, alpha, captions, noise, t, train: bool = True):
        """Forward + the three losses; returns (total, {part: detached value})."""
        s, lo = self.s, self.cfg.loss
        cond, y, ind, has = s.conditioning(captions)
        ab = s.alphas_cumprod[t].to(s.device)
        noise = noise.to(s.device)
        x_t = losses.add_noise(x0, noise, ab)
        want_green = lo.green > 0
        self.capture.set_tokens(ind if want_green else None)
        opts = self.capture.transformer_options() if want_green else {}
        with s.autocast():
            out = (self.ddp if train else self.module)(x_t, t.float().to(s.device), cond, y, opts)
        out = out.float()
        parts = {}
        target = losses.diffusion_target(x0, noise, ab, s.prediction)
        total = lo.diffusion * losses.diffusion_loss(out, target) if lo.diffusion > 0 else out.new_zeros(())
        parts["diffusion"] = losses.diffusion_loss(out.detach(), target)
        if want_green:
            lg = losses.green_attention_loss(self.capture.maps(), alpha.to(s.device), tuple(x0.shape[-2:]),
                                             sample_weight=has)
            total = total + lo.green * lg
            parts["green"] = lg.detach()
        if lo.detail > 0:
            x0_hat = losses.predicted_x0(x_t, out, ab, s.prediction)
            w = losses.detail_sample_weight(ab, s.prediction, lo.detail_weighting)
            ld = losses.detail_loss(x0_hat, x0, alpha.to(s.device), lo.detail_band_weight, sample_weight=w)
            total = total + lo.detail * ld
            parts["detail"] = ld.detach()
        self.capture.set_tokens(None)     # the loop runs backward after this (checkpointing re-runs blocks)
        return total, parts

    # ------------------------------------------------------------------ measures
    def _holdout_tensors(self):
        s = self.s
        x0 = s.encode_images(torch.stack([torch.from_numpy(h.image).permute(2, 0, 1) for h in self.holdout]))
        alpha = torch.stack([torch.from_numpy(h.alpha)[None] for h in self.holdout]).to(s.device)
        return x0, alpha

    def _fixed_noise(self, shape, tag: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_of(self.cfg.run.seed, 0xE7A1, tag))
        return torch.randn(shape, generator=g).to(self.s.device)

    @torch.no_grad()
    def measure(self, when: str) -> dict:
        if not self.holdout:
            return {}
        out = {f"green_iou_{when}": self.green_iou(), f"edge_sharpness_{when}": self.edge_sharpness()}
        if when == "before":
            out.update(self.constant_answers())
        return out

    @torch.no_grad()
    def green_iou(self) -> float:
        """Mean IoU at the median threshold between the green token's attention (averaged over the
        captured layers and heads) and the background, on the held-out samples at fixed timesteps."""
        s = self.s
        from ..models.prompting import add_green_phrase

        x0, alpha = self._holdout_tensors()
        cond, y, ind, has = s.conditioning([add_green_phrase(h.caption, s.phrase) for h in self.holdout])
        scores = []
        for t_eval in EVAL_TIMESTEPS:
            noise = self._fixed_noise(x0.shape, t_eval)
            t = torch.full((x0.shape[0],), t_eval)
            ab = s.alphas_cumprod[t].to(s.device)
            self.capture.set_tokens(ind)
            with s.autocast():
                self.module(losses.add_noise(x0, noise, ab), t.float().to(s.device), cond, y,
                            self.capture.transformer_options())
            maps = self.capture.maps()
            self.capture.set_tokens(None)
            hw = tuple(x0.shape[-2:])
            finest = max((losses._map_hw(m, hw) for m in maps), key=lambda m: m.shape[-1])
            size = tuple(finest.shape[-2:])
            mean_map = torch.stack([F.interpolate(losses._map_hw(m.float(), hw), size=size, mode="bilinear",
                                                  align_corners=False) for m in maps]).mean(0)
            scores.append(losses.attention_iou(mean_map, alpha)[has > 0])
        return float(torch.cat(scores).mean())

    def _edge_reference(self, x0, alpha):
        s = self.s
        band = edge_band(alpha, max(2, self.cfg.data.resolution // 64))
        ref = mean_edge_gradient(s.decode_latents(x0), band)
        return band, ref

    @torch.no_grad()
    def edge_sharpness(self) -> float:
        """Mean edge gradient near the object of the decoded x0 predicted from low noise (t=200), relative
        to the VAE reconstruction of the held-out image (1 = as sharp as the data)."""
        s = self.s
        from ..models.prompting import add_green_phrase

        x0, alpha = self._holdout_tensors()
        band, ref = self._edge_reference(x0, alpha)
        cond, y, _, _ = s.conditioning([add_green_phrase(h.caption, s.phrase) for h in self.holdout])
        t = torch.full((x0.shape[0],), EDGE_TIMESTEP)
        ab = s.alphas_cumprod[t].to(s.device)
        noise = self._fixed_noise(x0.shape, EDGE_TIMESTEP)
        x_t = losses.add_noise(x0, noise, ab)
        with s.autocast():
            out = self.module(x_t, t.float().to(s.device), cond, y, {}).float()
        x0_hat = losses.predicted_x0(x_t, out, ab, s.prediction)
        got = mean_edge_gradient(s.decode_latents(x0_hat), band)
        return float((got / ref.clamp_min(1e-6)).mean())

    @torch.no_grad()
    def constant_answers(self) -> dict:
        """Scores of answers that ignore the input. Green IoU: one map for every sample, the distance from
        the canvas centre (the centre prior: objects sit mid-canvas, background around them), scored like
        the attention. Edge sharpness: a flat answer (the mean latent, decoded)."""
        x0, alpha = self._holdout_tensors()
        f = min(self.cfg.loss.green_factors)
        h, w = -(-x0.shape[-2] // f), -(-x0.shape[-1] // f)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        prior = (yy ** 2 + xx ** 2).sqrt().to(alpha.device).expand(alpha.shape[0], 1, h, w).contiguous()
        iou = losses.attention_iou(prior, alpha)
        band, ref = self._edge_reference(x0, alpha)
        flat = x0.mean(dim=(0, 2, 3), keepdim=True).expand_as(x0).contiguous()
        got = mean_edge_gradient(self.s.decode_latents(flat), band)
        return {"green_iou_constant": float(iou.mean()), "edge_sharpness_constant": float((got / ref).mean())}

    # ------------------------------------------------------------------ files
    def export(self) -> Path:
        s, u = self.s, self.cfg.unet
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[u.save_dtype]
        meta = {"kind": "unet", "format_version": str(UNET_FORMAT_VERSION), "base_architecture": s.family,
                "phrase": s.phrase, "prediction": s.prediction, "trainer": "diffumatting train.py",
                "steps": str(u.steps), "green_weight": str(self.cfg.loss.green),
                "detail_weight": str(self.cfg.loss.detail)}
        if self.lora is not None:
            from .lora import export_kohya

            path = s.out / LORA_FILE
            meta["kind"] = "lora"
            export_kohya(path, self.lora, s.base, dtype=dtype, metadata=meta)
            return path
        from safetensors.torch import save_file

        path = s.out / UNET_FILE
        tensors = {f"diffusion_model.{k}": v.detach().to("cpu", dtype).contiguous()
                   for k, v in s.unet.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @torch.no_grad()
    def sample(self, step: int):
        """Generated images (DDIM) and a simple green-key alpha over a checkerboard."""
        s, r = self.s, self.cfg.run
        if not s.dist.is_main:
            return
        from ..models.prompting import add_green_phrase

        items = s.hold_items or s.train_items
        caps = [add_green_phrase(items[i % len(items)].caption, s.phrase) for i in range(r.sample_count)]
        cond, y, _, _ = s.conditioning(caps)
        uncond, uy, _, _ = s.conditioning([""] * len(caps))
        lat = self.cfg.data.resolution // 8
        g = torch.Generator().manual_seed(seed_of(self.cfg.run.seed, 0x5A3E))
        x = torch.randn((len(caps), 4, lat, lat), generator=g).to(s.device)
        ts = torch.linspace(999, 0, r.sample_steps).round().long()
        acp = s.alphas_cumprod
        for i, t in enumerate(ts):
            ab = acp[t].to(s.device)
            ab_prev = acp[ts[i + 1]].to(s.device) if i + 1 < len(ts) else torch.tensor(1.0, device=s.device)
            tt = torch.full((2 * len(caps),), float(t), device=s.device)
            yy = None if y is None else torch.cat([y, uy])
            with s.autocast():
                o = self.module(torch.cat([x, x]), tt, torch.cat([cond, uncond]), yy, {}).float()
            oc, ou = o.chunk(2)
            o = ou + r.sample_cfg * (oc - ou)
            if s.prediction == "eps":
                eps, x0 = o, (x - (1 - ab).sqrt() * o) / ab.sqrt()
            else:
                x0, eps = ab.sqrt() * x - (1 - ab).sqrt() * o, (1 - ab).sqrt() * x + ab.sqrt() * o
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        img = s.decode_latents(x).permute(0, 2, 3, 1).cpu().numpy()
        rows = []
        for im in img:
            greenness = im[..., 1] - np.maximum(im[..., 0], im[..., 2])
            a = 1.0 - np.clip(greenness / 0.15, 0, 1)
            rows.append([im, a, over_checker(im, a)])
        write_grid(s.out / "samples" / f"unet-{step:07d}.png", rows)

    def teardown(self):
        s = self.s
        if self.lora is not None:
            self.lora.detach()
        self.ddp = self.module = None
        self.optimizer = None
        s.unet.requires_grad_(False)
        s.unet.to("cpu")
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
