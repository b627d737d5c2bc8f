"""Decode a latent once and get colour and alpha; untiled or tiled with blended overlaps.

Plain torch: the caller passes `decode_fn(latent_chunk) -> raw decoder output (B,3,H,W)` (for ComfyUI,
`vae.first_stage_model.decode`) and the decoder module the head taps. The node adds ComfyUI's memory
management, devices, progress and interruption.

Tiling: the latent is cut into overlapping tiles; each tile is decoded once with the head on its
features, and colour and alpha (4 channels) are blended with linear ramps over the overlaps (weights are
normalised, so any overlap pattern sums to 1). Pixels at a tile's inner edges get almost no weight: the
decoder's zero padding distorts them and the neighbour's interior covers them.
"""
from __future__ import annotations

from typing import Callable

import torch

from .matting_head import HeadTaps, MattingHead


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` shared cells."""
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def _ramp(n: int, ramp: int, lead: bool, trail: bool, device, dtype) -> torch.Tensor:
    """1-D blend weight of a tile of n pixels: rises over `ramp` pixels on sides with a neighbour."""
    w = torch.ones(n, device=device, dtype=dtype)
    if ramp > 0:
        r = (torch.arange(min(ramp, n), device=device, dtype=dtype) + 0.5) / ramp
        if lead:
            w[: r.numel()] = torch.minimum(w[: r.numel()], r)
        if trail:
            w[n - r.numel():] = torch.minimum(w[n - r.numel():], r.flip(0))
    return w


def tiled_apply(latent: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], scale: int, tile: int,
                overlap: int, out_channels: int, output_device=None,
                on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """Apply `fn` (latent tile (B,C,h,w) -> (B,out_channels,h*scale,w*scale)) over overlapping tiles and blend.

    `tile` and `overlap` are in latent pixels. Returns float32 (B,out_channels,H*scale,W*scale) on
    `output_device` (default: the latent's device). `on_tile` is called after each tile (progress,
    interruption).
    """
    if latent.ndim != 4:
        raise ValueError(f"latent must be (B,C,H,W), got shape {tuple(latent.shape)}")
    b, _, hl, wl = latent.shape
    output_device = latent.device if output_device is None else output_device
    out = torch.zeros((b, out_channels, hl * scale, wl * scale), device=output_device, dtype=torch.float32)
    wsum = torch.zeros((1, 1, hl * scale, wl * scale), device=output_device, dtype=torch.float32)
    ys, xs = tile_starts(hl, tile, overlap), tile_starts(wl, tile, overlap)
    ramp = overlap * scale
    for y in ys:
        for x in xs:
            th, tw = min(tile, hl - y), min(tile, wl - x)
            piece = fn(latent[:, :, y:y + th, x:x + tw])
            expected = (b, out_channels, th * scale, tw * scale)
            if tuple(piece.shape) != expected:
                raise ValueError(f"tile function returned shape {tuple(piece.shape)}, expected {expected}")
            piece = piece.to(device=output_device, dtype=torch.float32)
            wy = _ramp(th * scale, ramp, y > 0, y + th < hl, output_device, torch.float32)
            wx = _ramp(tw * scale, ramp, x > 0, x + tw < wl, output_device, torch.float32)
            weight = wy[:, None] * wx[None, :]
            sy, sx = slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale)
            out[:, :, sy, sx] += piece * weight
            wsum[:, :, sy, sx] += weight
            del piece
            if on_tile is not None:
                on_tile()
    return out.div_(wsum)


def count_tiles(latent_shape, tile: int, overlap: int) -> int:
    """How many tiles `tiled_apply` runs for one batch."""
    return len(tile_starts(latent_shape[-2], tile, overlap)) * len(tile_starts(latent_shape[-1], tile, overlap))


def decode_rgba(decode_fn: Callable[[torch.Tensor], torch.Tensor], decoder: torch.nn.Module,
                head: MattingHead | None, latent: torch.Tensor) -> torch.Tensor:
    """One decoder pass over `latent`: raw colour (B,3,H,W) in the decoder's range, plus alpha in [0,1] as a
    4th channel when `head` is given. The head runs inside the decoder's forward pass (hooks)."""
    if head is None:
        return decode_fn(latent)
    with HeadTaps(decoder, head) as taps:
        raw = decode_fn(latent)
        alpha = taps.pop_alpha()
    if alpha.shape[-2:] != raw.shape[-2:] or alpha.shape[0] != raw.shape[0]:
        raise ValueError(f"the head's alpha {tuple(alpha.shape)} does not match the decoded image "
                         f"{tuple(raw.shape)}: the fine tap is not at full resolution")
    return torch.cat([raw, alpha.to(raw.dtype)], dim=1)
