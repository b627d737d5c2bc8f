"""Decode orchestration of DiffuMatting VAE Decode, through core's own VAE entry points.

The node calls `decode(vae, latent, head, tiling, tile_size, overlap)`. It runs core's `VAE.decode` (or
`VAE.decode_tiled` for tiling "always") with the head's hooks attached for that call only
(models/matting_decode.AlphaChannel): the decoder returns colour plus alpha from its ONE pass, so core's
decode does everything for both: device context, model loading, memory sizing and batch chunking, the
out-of-memory fallback to tiles, tile blending, progress, output device and dtype.

Core is called on a shallow copy of the VAE object (`vae_with_alpha`); the caller's VAE is never modified.
The copy differs in two attributes: `output_channels` + 1 (core's tiled decode allocates that many output
channels) and `memory_used_decode`, which adds the head's working memory to core's estimate so that core's
chunking and model loading make room for it. Older cores (0.3.75) allocate three channels in their 2-D
tiled decode whatever `output_channels` says; for those only, the copy also carries
`tiled_decode_all_channels`, the same three-tiling decode with all channels (see core_tiles_all_channels).

Core symbols used here (checked against ComfyUI 0.3.75 and the newest Comfy-Org/ComfyUI, see
nodes/_core_symbols.py): VAE.decode, VAE.decode_tiled, VAE.memory_used_decode, VAE.output_channels,
VAE.first_stage_model(.decoder), VAE.spacial_compression_decode, VAE.vae_dtype, VAE.latent_dim,
VAE.throw_exception_if_invalid, model_management.dtype_size,
model_management.throw_exception_if_processing_interrupted.
"""
from __future__ import annotations

import copy
import inspect
import os
from contextlib import nullcontext
from enum import Enum

import torch
from einops import rearrange

from ..models.matting_decode import AlphaChannel
from ..models.matting_head import VAE_FAMILIES, HeadConfig, LoadedHead


class Tiling(str, Enum):
    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


class WholeDecodeOutOfMemory(RuntimeError):
    """Tiling "never": the whole-image decode ran out of memory and core went on to decode tiles."""


def upscale(vae) -> int:
    """The VAE's spatial upscale factor (8 for the KL-f8 VAEs the head supports)."""
    fn = getattr(vae, "spacial_compression_decode", None)
    ratio = fn() if callable(fn) else getattr(vae, "upscale_ratio", 8)
    if not isinstance(ratio, int):
        raise ValueError(f"this VAE's spatial upscale {ratio!r} is not a plain factor; the matting head supports "
                         f"image VAEs (SD1.x/SD2 and SDXL KL-f8)")
    return ratio


def check_head_fits(vae, samples: torch.Tensor, loaded: LoadedHead) -> torch.nn.Module:
    """The VAE's decoder module when the head fits this VAE and latent; else a ValueError naming both."""
    vae.throw_exception_if_invalid()
    fsm = vae.first_stage_model
    decoder = getattr(fsm, "decoder", None)
    cfg = loaded.config
    family = VAE_FAMILIES[loaded.vae_family]
    if (getattr(vae, "latent_dim", 2) != 2 or decoder is None or not hasattr(decoder, "conv_out")
            or getattr(vae, "handles_tiling", False) or getattr(fsm, "comfy_has_chunked_io", False)):
        raise ValueError(f"this VAE ({type(fsm).__name__}) is not an image KL decoder; the matting head "
                         f"{os.path.basename(loaded.path) or ''} was trained for the {family}. Use the VAE of an "
                         f"SD1.x/SD2 or SDXL checkpoint.")
    if samples.shape[1] != cfg.latent_channels:
        raise ValueError(f"the latent has {samples.shape[1]} channels but the matting head was trained for the "
                         f"{family} with {cfg.latent_channels}-channel latents; decode this latent with its own "
                         f"VAE and a head trained for it")
    scale = upscale(vae)
    if scale != cfg.upscale:
        raise ValueError(f"this VAE upscales latents {scale}x, the matting head expects {cfg.upscale}x ({family})")
    conv_in = getattr(decoder.conv_out, "in_channels", cfg.fine_channels)
    if cfg.fine_tap == "conv_out:input" and conv_in != cfg.fine_channels:
        raise ValueError(f"this VAE decoder's last features have {conv_in} channels, the matting head expects "
                         f"{cfg.fine_channels} ({family}); use a head trained for this VAE")
    names = dict(decoder.named_modules())
    for tap in cfg.taps:
        if tap.split(":")[0] not in names:
            raise ValueError(f"this VAE decoder has no module {tap.split(':')[0]!r} that the matting head reads; "
                             f"the head was trained for the {family}")
    return decoder


def head_memory(shape, config: HeadConfig, scale: int, dtype_size: int) -> float:
    """Bytes the head adds to a decode of a latent of `shape` (B,C,h,w): its full-resolution layers (in the
    VAE's dtype, `dtype_size` bytes) and, in float32 (models/matting_decode.py), the alpha, its encoded
    channel, the widened colour and the one-channel-wider decoder output (10 values a pixel)."""
    layers = 2 * config.hidden + 2 * config.coarse_dim * len(config.coarse_taps)
    return shape[0] * shape[2] * shape[3] * scale * scale * (layers * dtype_size + 10 * 4)


def vae_with_alpha(vae, loaded: LoadedHead):
    """A shallow copy of `vae` for one decode with the head: one more output channel, head memory counted."""
    from comfy import model_management

    view = copy.copy(vae)
    base_estimate, scale = vae.memory_used_decode, upscale(vae)
    view.output_channels = vae.output_channels + 1
    view.memory_used_decode = lambda shape, dtype: (
        base_estimate(shape, dtype) + head_memory(shape, loaded.config, scale, model_management.dtype_size(dtype)))
    if not core_tiles_all_channels(vae):
        view.decode_tiled_ = lambda samples, **kw: tiled_decode_all_channels(view, samples, **kw)
    return view


def core_tiles_all_channels(vae) -> bool:
    """Whether core's 2-D tiled decode allocates `output_channels` channels (newer cores, e.g. the newest
    Comfy-Org/ComfyUI) or always three (ComfyUI 0.3.75 and other older cores)."""
    try:
        return "out_channels=self.output_channels" in inspect.getsource(type(vae).decode_tiled_)
    except (AttributeError, OSError, TypeError):
        return False


def tiled_decode_all_channels(view, samples: torch.Tensor, tile_x: int = 64, tile_y: int = 64,
                              overlap: int = 16) -> torch.Tensor:
    """For older cores only (see core_tiles_all_channels): core's 2-D tiled decode as those cores run it
    (comfy.utils.tiled_scale over three tilings, averaged, the same progress bar), but with all of the view's
    output channels. Core's own VAE.decode / VAE.decode_tiled still call it, with their loading and device
    handling around it."""
    import comfy.utils

    tilings = ((tile_x // 2, tile_y * 2), (tile_x * 2, tile_y // 2), (tile_x, tile_y))
    steps = sum(samples.shape[0] * comfy.utils.get_tiled_scale_steps(samples.shape[3], samples.shape[2], tx, ty,
                                                                     overlap) for tx, ty in tilings)
    pbar = comfy.utils.ProgressBar(steps)

    def decode_fn(latent):
        return view.first_stage_model.decode(latent.to(view.vae_dtype).to(view.device)).float()

    parts = [comfy.utils.tiled_scale(samples, decode_fn, tx, ty, overlap, upscale_amount=view.upscale_ratio,
                                     out_channels=view.output_channels, output_device=view.output_device, pbar=pbar)
             for tx, ty in tilings]
    return view.process_output((parts[0] + parts[1] + parts[2]) / 3.0)


def core_tile_args(vae, tile_size: int, overlap: int) -> dict:
    """decode_tiled's tile_x/tile_y/overlap (latent pixels) for a tile size and overlap in pixels. Core's tiled
    decode also runs tiles of t/2 x 2t, so the overlap stays below t/4 (it must be below t/2)."""
    scale = upscale(vae)
    t = max(8, int(tile_size) // scale)
    return {"tile_x": t, "tile_y": t, "overlap": max(0, min(int(overlap) // scale, t // 4))}


def _on_call(tiling: Tiling, full_hw: tuple[int, int]):
    from comfy import model_management

    def check(features: torch.Tensor) -> None:
        model_management.throw_exception_if_processing_interrupted()
        if tiling is Tiling.NEVER and tuple(features.shape[-2:]) != full_hw:
            raise WholeDecodeOutOfMemory(
                f"the whole {full_hw[0]}x{full_hw[1]} latent did not fit in memory and tiling is 'never'; set "
                f"tiling to 'auto' (tiles when needed) or 'always', or decode a smaller batch")
    return check


def decode(vae, samples: torch.Tensor, loaded: LoadedHead | None = None, tiling: Tiling = Tiling.AUTO,
           tile_size: int = 512, overlap: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rgb (B,H,W,3), alpha (B,H,W) or None without a head), float32 on the VAE's output device.

    auto: core's VAE.decode (whole image, core tiles when out of memory); always: core's VAE.decode_tiled;
    never: whole image, WholeDecodeOutOfMemory instead of tiles.
    """
    if samples.ndim == 5 and samples.shape[2] == 1:
        samples = samples[:, :, 0]
    decoder = None
    if loaded is not None:
        if samples.ndim != 4:
            raise ValueError(f"LATENT samples must be (B,C,H,W) image latents, got shape {tuple(samples.shape)}")
        decoder = check_head_fits(vae, samples, loaded)
        target = vae_with_alpha(vae, loaded)
    else:
        vae.throw_exception_if_invalid()
        found = getattr(vae.first_stage_model, "decoder", None)
        decoder = found if isinstance(found, torch.nn.Module) and samples.ndim == 4 else None
        target = vae
    hooks = (AlphaChannel(decoder, loaded.head if loaded is not None else None,
                          _on_call(tiling, tuple(samples.shape[-2:]))) if decoder is not None else None)
    with torch.no_grad(), (hooks if hooks is not None else nullcontext()):
        if tiling is Tiling.ALWAYS:
            out = target.decode_tiled(samples, **core_tile_args(vae, tile_size, overlap))
        else:
            out = target.decode(samples)
    if out.ndim == 5:  # video VAEs (no-head path): every frame of every item becomes a batch image
        out = rearrange(out, "b t h w c -> (b t) h w c")
    out = out.float()
    if loaded is None:
        return out[..., :3].contiguous(), None
    return out[..., :3].contiguous(), out[..., 3].clamp(0.0, 1.0)

