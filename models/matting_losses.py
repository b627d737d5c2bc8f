"""Losses for training the matting head (reused by the trainer).

Tensors are BCHW: alpha (B,1,H,W) (or (B,H,W)), colours (B,3,H,W), values in [0, 1].
Every loss takes an optional `weight` (B,1,H,W) or (B,H,W), e.g. an unknown-region mask, and returns a
scalar mean over the weighted pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_b1hw(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must be (B,1,H,W) or (B,H,W), got shape {tuple(x.shape)}")
    return x


def _weighted_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return err.mean()
    weight = _as_b1hw(weight, "weight").to(err)
    weight = weight.expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1e-6)


def alpha_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute alpha error."""
    pred, target = _as_b1hw(pred, "pred"), _as_b1hw(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} alpha must have the same shape")
    return _weighted_mean((pred - target).abs(), weight)


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gx, gy) Sobel gradients of (B,1,H,W), replicate-padded (same size)."""
    x = _as_b1hw(x, "alpha")
    kx = _SOBEL_X.to(x).view(1, 1, 3, 3)
    ky = kx.transpose(-1, -2)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(xp, kx), F.conv2d(xp, ky)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between the Sobel gradients of predicted and true alpha (sharp, well-placed edges)."""
    pgx, pgy = sobel(pred)
    tgx, tgy = sobel(target)
    return _weighted_mean((pgx - tgx).abs() + (pgy - tgy).abs(), weight)


def composition_loss(pred_alpha: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor,
                     image: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between the image and the foreground composited over the background with the predicted alpha."""
    a = _as_b1hw(pred_alpha, "pred_alpha")
    for name, t in (("foreground", foreground), ("background", background), ("image", image)):
        if t.ndim != 4 or t.shape[0] != a.shape[0] or t.shape[-2:] != a.shape[-2:]:
            raise ValueError(f"{name} must be (B,C,H,W) matching alpha {tuple(a.shape)}, got {tuple(t.shape)}")
    comp = a * foreground + (1.0 - a) * background
    return _weighted_mean((comp - image).abs().mean(dim=1, keepdim=True), weight)


def matting_loss(pred: torch.Tensor, target: torch.Tensor, foreground: torch.Tensor | None = None,
                 background: torch.Tensor | None = None, image: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, w_l1: float = 1.0, w_grad: float = 1.0,
                 w_comp: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the three losses (composition only when foreground, background and image are given);
    returns (total, {name: value})."""
    parts = {"l1": alpha_l1(pred, target, weight), "grad": gradient_loss(pred, target, weight)}
    total = w_l1 * parts["l1"] + w_grad * parts["grad"]
    if foreground is not None and background is not None and image is not None:
        parts["comp"] = composition_loss(pred, foreground, background, image, weight)
        total = total + w_comp * parts["comp"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
