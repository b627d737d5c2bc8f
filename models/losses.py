"""The DiffuMatting training losses (plain torch; shared by train.py and the tests).

- `diffusion_target` / `predicted_x0` / `diffusion_loss`: the usual denoising loss for epsilon- or
  v-prediction models on the discrete DDPM schedule (alpha_bar per sample).
- `green_attention_loss`: the green-background control loss. Its input is the cross-attention
  probability of the "green" token(s) per query pixel (already averaged over heads, e.g. by
  training/attention.py), one map per chosen UNet layer. Each map is min-max normalised per sample and
  pulled (MSE) toward the background mask 1 - alpha, area-downsampled to the map's size.
- `sobel_magnitude` / `detail_loss`: the transition-boundary detail loss. Sobel gradient magnitudes of
  the predicted clean latent (or image) and of the ground truth are matched (L1), with weight
  1 + band_weight on the band where 0 < alpha < 1 (the object's soft edge, hair, see-through parts).
- `attention_iou`: IoU at the median threshold between an attention map and the background mask, the
  measure of how well the green token's attention covers the background.

Shapes: latents (B,C,h,w); alpha (B,1,H,W) or (B,H,W) in [0,1], any resolution (it is resampled);
attention maps (B,N) with N = h*w flattened row-major (or (B,h,w)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .matting_losses import _as_b1hw

PREDICTIONS = ("eps", "v")


def _bcast(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.to(like).view(-1, *([1] * (like.ndim - 1)))


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


# --- diffusion ------------------------------------------------------------------------------------------
def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) noise, `alpha_bar` (B,) per sample."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the model is trained to output: the noise (eps) or v = sqrt(a) noise - sqrt(1-a) x0."""
    if _check_prediction(prediction) == "eps":
        return noise
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def predicted_x0(x_t: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The clean latent implied by the model output at x_t."""
    a = _bcast(alpha_bar, x_t)
    if _check_prediction(prediction) == "eps":
        return (x_t - (1 - a).sqrt() * model_output) / a.sqrt().clamp_min(1e-4)
    return a.sqrt() * x_t - (1 - a).sqrt() * model_output


def diffusion_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the model output and its target."""
    if model_output.shape != target.shape:
        raise ValueError(f"model output {tuple(model_output.shape)} and target {tuple(target.shape)} differ in shape")
    return F.mse_loss(model_output.float(), target.float())


# --- green-background control ---------------------------------------------------------------------------
def background_mask(alpha: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """1 - alpha area-averaged to `size` (h, w): (B,1,h,w), 1 = pure background."""
    alpha = _as_b1hw(alpha, "alpha").float()
    if tuple(alpha.shape[-2:]) != tuple(size):
        alpha = F.adaptive_avg_pool2d(alpha, size)
    return 1.0 - alpha


def normalise_map(att: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample min-max normalisation of (B, ...) maps to [0, 1] (a constant map becomes 0)."""
    flat = att.reshape(att.shape[0], -1).float()
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view(att.shape)


def _map_hw(att: torch.Tensor, latent_hw: tuple[int, int] | None) -> torch.Tensor:
    """(B,N), (B,h,w) or (B,1,h,w) attention -> (B,1,h,w); N must be (H/f)*(W/f) for an integer f."""
    if att.ndim == 4 and att.shape[1] == 1:
        return att
    if att.ndim == 3:
        return att.unsqueeze(1)
    if att.ndim != 2:
        raise ValueError(f"attention maps must be (B,N) or (B,h,w), got shape {tuple(att.shape)}")
    n = att.shape[1]
    if latent_hw is None:
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise ValueError(f"attention map with {n} pixels is not square: pass latent_hw")
        return att.view(att.shape[0], 1, side, side)
    lh, lw = latent_hw
    for f in (1, 2, 4, 8, 16, 32, 64):
        h, w = -(-lh // f), -(-lw // f)
        if h * w == n:
            return att.view(att.shape[0], 1, h, w)
    raise ValueError(f"attention map with {n} pixels does not fit a latent of {lh}x{lw} at any power-of-two scale")


def green_attention_loss(maps, alpha: torch.Tensor, latent_hw: tuple[int, int] | None = None,
                         sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between normalised green-token attention maps and the downsampled background mask 1 - alpha.

    `maps`: one tensor or a list, each (B,N) or (B,h,w) (averaged over heads and green tokens).
    `sample_weight` (B,) masks samples whose prompt has no green token (e.g. dropped captions).
    Averaged over the maps; 0 when there is no map or every sample weight is 0.
    """
    if isinstance(maps, torch.Tensor):
        maps = [maps]
    maps = list(maps)
    alpha = _as_b1hw(alpha, "alpha")
    if not maps:
        return alpha.new_zeros(())
    total = 0.0
    for att in maps:
        if att.shape[0] != alpha.shape[0]:
            raise ValueError(f"attention batch {att.shape[0]} and alpha batch {alpha.shape[0]} differ")
        m = _map_hw(att, latent_hw)
        target = background_mask(alpha, tuple(m.shape[-2:])).to(m.device)
        err = (normalise_map(m) - target).pow(2).flatten(1).mean(dim=1)   # (B,)
        if sample_weight is None:
            total = total + err.mean()
        else:
            w = sample_weight.to(err)
            total = total + (err * w).sum() / w.sum().clamp_min(1e-6)
    return total / len(maps)


def attention_iou(att: torch.Tensor, alpha: torch.Tensor, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-sample IoU (B,) of {attention > its median} and {background mask > 0.5}."""
    m = _map_hw(att.detach().float(), latent_hw)
    bg = background_mask(alpha.detach(), tuple(m.shape[-2:])).to(m.device) > 0.5
    flat = m.flatten(1)
    med = flat.median(dim=1, keepdim=True).values
    on = flat > med
    bgf = bg.flatten(1)
    inter = (on & bgf).sum(dim=1).float()
    union = (on | bgf).sum(dim=1).float()
    return inter / union.clamp_min(1.0)


# --- transition-boundary detail -------------------------------------------------------------------------
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude of (B,C,H,W) (replicate padding, same size).

    The kernel is normalised by 8, so a unit step gives magnitude 1/2 on the two pixels beside it.
    """
    if x.ndim != 4:
        raise ValueError(f"sobel_magnitude expects (B,C,H,W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    flat = F.pad(x.reshape(b * c, 1, h, w).float(), (1, 1, 1, 1), mode="replicate")
    kx = _SOBEL_X.to(flat).view(1, 1, 3, 3)
    k = torch.cat([kx, kx.transpose(-1, -2)], dim=0)
    g = F.conv2d(flat, k)
    return (g.pow(2).sum(dim=1) + eps).sqrt().view(b, c, h, w) - math.sqrt(eps)


def transition_band(alpha: torch.Tensor, size: tuple[int, int], lo: float = 0.02, hi: float = 0.98) -> torch.Tensor:
    """(B,1,h,w) in {0,1}: 1 where any pixel of the cell has lo < alpha < hi (max-pooled to `size`)."""
    alpha = _as_b1hw(alpha, "alpha").float()
    band = ((alpha > lo) & (alpha < hi)).float()
    if tuple(band.shape[-2:]) != tuple(size):
        band = F.adaptive_max_pool2d(band, size)
    return band


def detail_loss(pred: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, band_weight: float = 4.0,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between Sobel magnitudes of `pred` and `target` (B,C,h,w), weight 1 + band_weight on the band.

    `sample_weight` (B,) scales each sample (the trainer passes sqrt(alpha_bar), which cancels the
    1/sqrt(alpha_bar) amplification of the noise in an epsilon model's predicted x0 at high noise).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if band_weight < 0:
        raise ValueError(f"band_weight must be >= 0, got {band_weight}")
    w = 1.0 + band_weight * transition_band(alpha, tuple(pred.shape[-2:])).to(pred.device)   # (B,1,h,w)
    err = (sobel_magnitude(pred) - sobel_magnitude(target.detach())).abs()
    per = (err * w).flatten(1).sum(dim=1) / (w.flatten(1).sum(dim=1) * pred.shape[1])    # (B,)
    if sample_weight is not None:
        per = per * sample_weight.to(per)
    return per.mean()


DETAIL_WEIGHTINGS = ("low_noise", "sqrt_alpha_bar")


def detail_sample_weight(alpha_bar: torch.Tensor, prediction: str, weighting: str = "low_noise") -> torch.Tensor:
    """(B,) per-sample weight of the detail loss computed on the predicted x0.

    The predicted x0 depends on the model output with slope c = sqrt((1 - a) / a) (eps) or sqrt(1 - a)
    (v), so a weight w gives the detail term a gradient on the output proportional to w * c.
    - "low_noise": w = a / c, so that gradient scales with alpha_bar: largest at low noise, where edges
      can form, and vanishing at high noise, where the predicted x0 is a blur whatever the model does;
    - "sqrt_alpha_bar": w = sqrt(a) (the first version): the gradient then scales with sqrt(1 - a),
      largest at HIGH noise.
    """
    a = alpha_bar.float()
    if weighting == "sqrt_alpha_bar":
        return a.sqrt()
    if weighting != "low_noise":
        raise ValueError(f"detail weighting {weighting!r}: use one of {DETAIL_WEIGHTINGS}")
    if _check_prediction(prediction) == "eps":
        slope = (1 - a).clamp_min(0).sqrt() / a.sqrt().clamp_min(1e-4)
    else:
        slope = (1 - a).clamp_min(0).sqrt()
    return a / slope.clamp_min(1e-3)
