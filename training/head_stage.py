"""The matting-head stage: a small head on the frozen VAE decoder's features learns alpha."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.matting_head import FeatureTaps, HeadConfig, MattingHead, save_head
from ..models.matting_losses import matting_loss
from .report import over_checker, write_grid
from .stage import Stage, make_adamw

HEAD_FILE = "diffumatting_head.safetensors"


def _chw(batch, attr: str) -> torch.Tensor:
    return torch.stack([torch.from_numpy(getattr(s, attr)).permute(2, 0, 1) for s, _, _ in batch])


def _alpha(batch) -> torch.Tensor:
    return torch.stack([torch.from_numpy(s.alpha)[None] for s, _, _ in batch])


class HeadStage(Stage):
    name = "head"

    def __init__(self, session):
        super().__init__(session)
        self.head = self.head_ddp = None
        self._features: dict = {}
        self.holdout = session.holdout_samples("head")

    def variants(self):
        return self.cfg.data.cache_variants if self.cfg.head.feature_cache else None

    def setup(self):
        s, h = self.s, self.cfg.head
        dec_sd = {f"decoder.{k}": v for k, v in s.fsm.decoder.state_dict().items()}
        self.head_config = HeadConfig.for_vae_state_dict(dec_sd, prefix="decoder.", coarse_levels=h.coarse_levels,
                                                         hidden=h.hidden)
        self.head = MattingHead(self.head_config).reset_parameters(self.cfg.run.seed).to(s.device)
        self.family = s.vae_family if h.vae_family == "auto" else h.vae_family
        self.head_ddp = self.head
        if s.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.head_ddp = DDP(self.head, device_ids=[s.device.index] if s.device.type == "cuda" else None)
        self.params = list(self.head.parameters())
        self.optimizer = make_adamw(self.params, h.lr, 0.0)

    def trainable_state(self) -> dict:
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def load_trainable(self, tensors: dict):
        self.head.load_state_dict({k[5:]: v.to(self.s.device) for k, v in tensors.items() if k.startswith("head.")})

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def decoder_features(self, images: torch.Tensor):
        """Decoder features (fine, [coarse...]) of the encoded images: what the head sees when decoding."""
        s = self.s
        z = s.fsm.encode((images * 2 - 1).to(s.device, s.vae_dtype))
        with FeatureTaps(s.fsm.decoder, self.head_config.taps) as taps:
            s.fsm.decode(z)
        cfg = self.head_config
        return taps.features[cfg.fine_tap].float(), [taps.features[t].float() for t in cfg.coarse_taps]

    def features(self, batch):
        use_cache = self.cfg.head.feature_cache
        fine, coarse = [None] * len(batch), [None] * len(batch)
        todo = []
        for i, (_, idx, var) in enumerate(batch):
            hit = self._features.get((idx, var)) if use_cache else None
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
                    _, idx, var = batch[i]
                    self._features[(idx, var)] = (fine[i].cpu(), [c.cpu() for c in coarse[i]])
        dev = self.s.device
        fine = torch.cat(fine).to(dev)
        coarse = [torch.cat([c[k] for c in coarse]).to(dev) for k in range(len(self.head_config.coarse_taps))]
        return fine, coarse

    # ------------------------------------------------------------------ step
    def step(self, step: int, batch: list):
        return self.losses(batch)

    def losses(self, batch, train: bool = True):
        h, dev = self.cfg.head, self.s.device
        fine, coarse = self.features(batch)
        pred = (self.head_ddp if train else self.head)(fine, coarse)
        alpha = _alpha(batch).to(dev)
        # The composition target is the sample's exact composite (before softening and noise): with the
        # true alpha, a F + (1 - a) B equals it, so the loss has the ground truth as its minimum.
        total, parts = matting_loss(pred, alpha, _chw(batch, "foreground").to(dev), _chw(batch, "backing").to(dev),
                                    _chw(batch, "target").to(dev), w_l1=h.w_l1, w_grad=h.w_grad, w_comp=h.w_comp)
        if h.w_bce > 0:
            bce = F.binary_cross_entropy(pred.float().clamp(1e-6, 1 - 1e-6), alpha.float())
            total = total + h.w_bce * bce
            parts["bce"] = float(bce.detach())
        return total, {k: torch.tensor(v) for k, v in parts.items()}

    # ------------------------------------------------------------------ measures
    @torch.no_grad()
    def measure(self, when: str) -> dict:
        if not self.holdout:
            return {}
        errs = []
        for i in range(0, len(self.holdout), 4):
            batch = [(h, -1 - i - j, 0) for j, h in enumerate(self.holdout[i:i + 4])]
            fine, coarse = self.features(batch)
            pred = self.head(fine, coarse)
            errs.append((pred - _alpha(batch).to(self.s.device)).abs().flatten(1).mean(1))
        out = {f"head_error_{when}": float(torch.cat(errs).mean())}
        if when == "before":
            a = torch.stack([torch.from_numpy(h.alpha) for h in self.holdout])
            out["head_error_constant"] = float((a - a.median()).abs().mean())   # the best constant answer
        return out

    # ------------------------------------------------------------------ files
    def export(self) -> Path:
        return save_head(self.s.out / HEAD_FILE, self.head, self.family,
                         {"trainer": "diffumatting train.py", "steps": str(self.cfg.head.steps),
                          "base_checkpoint": self.s.checkpoint_path().name})

    @torch.no_grad()
    def sample(self, step: int):
        s = self.s
        if not s.dist.is_main or not self.holdout:
            return
        samples = self.holdout[: self.cfg.run.sample_count]
        batch = [(h, -1 - j, 0) for j, h in enumerate(samples)]
        fine, coarse = self.features(batch)
        pred = self.head(fine, coarse)[:, 0].float().cpu().numpy()
        rows = [[h.image, a, over_checker(h.image, a), h.alpha] for h, a in zip(samples, pred)]
        write_grid(s.out / "samples" / f"head-{step:07d}.png", rows)

    def teardown(self):
        self.head_ddp = None
        self._features.clear()
