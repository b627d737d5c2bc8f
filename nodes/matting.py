"""Matting-head VAE decode: colour and alpha from ONE decoder pass, plus the head file loader.

Convention (models/alpha.py): `alpha` is opacity (1 = opaque object); `transparency_mask` is core's
MASK convention (1 = transparent), i.e. 1 - alpha.
"""
from __future__ import annotations

import logging
import os
from enum import Enum

import torch
from comfy_api.latest import io

from ..models.matting_decode import count_tiles, decode_rgba, tiled_apply
from ..models.matting_head import HeadTaps, LoadedHead, VAE_FAMILIES, load_head
from ._files import MODEL_FOLDER, model_files, resolve_model_file
from ._schema import CATEGORY, enum_options, enum_value, schema

FAMILY = f"{CATEGORY}/matting"
MattingHeadType = io.Custom("DIFFUMATTING_HEAD")

ALPHA_TIP = "Opacity, 1 = opaque object, 0 = background (this pack's `alpha` convention)."
TMASK_TIP = ("Transparency mask = 1 - alpha (1 = transparent): core's MASK convention, for JoinImageWithAlpha "
             "and other core nodes.")


class FamilyCheck(str, Enum):
    FROM_FILE = "as in file"
    SD1 = "sd1"
    SDXL = "sdxl"


class Tiling(str, Enum):
    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


# --- head files --------------------------------------------------------------------------------------
def head_files() -> list[str]:
    """The .safetensors files in the diffumatting model folder(s), as relative names."""
    return model_files(MODEL_FOLDER)


def resolve_head_path(name: str) -> str:
    """Full path of head file `name` inside the diffumatting folder; refuses names that leave it."""
    return resolve_model_file(name, (MODEL_FOLDER,), "matting head")


class HeadLoader(io.ComfyNode):
    """Load a matting head (.safetensors) from models/diffumatting."""

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingHeadLoader",
            display_name="Load Matting Head",
            category=FAMILY,
            description="Loads a DiffuMatting matting head from models/diffumatting. The head reads the VAE "
                        "decoder's features during the decode and outputs alpha; its architecture and the VAE "
                        "family it was trained for come from the file itself.",
            search_aliases=["matting head", "alpha head", "load head", "vae alpha", "conr head"],
            inputs=[
                io.Combo.Input("head_name", options=head_files(),
                               tooltip="Head file (.safetensors) in ComfyUI's models/diffumatting folder."),
                io.Combo.Input("vae_family", options=enum_options(FamilyCheck), default=FamilyCheck.FROM_FILE.value,
                               tooltip="The VAE you decode with: sd1 = SD1.x/SD2 KL-f8, sdxl = SDXL KL-f8. A head "
                                       "trained for the other family is refused with an error. 'as in file' "
                                       "trusts the file (both families share one architecture, so the decode "
                                       "cannot tell them apart)."),
            ],
            outputs=[MattingHeadType.Output("head", display_name="head",
                                            tooltip="The matting head, for DiffuMatting VAE Decode.")],
        )

    @classmethod
    def validate_inputs(cls, head_name=None):  # only what it checks: core checks the rest
        if head_name is not None:
            try:
                resolve_head_path(head_name)
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, head_name, vae_family=FamilyCheck.FROM_FILE.value) -> io.NodeOutput:
        check = enum_value(FamilyCheck, vae_family, "vae_family")
        expected = None if check is FamilyCheck.FROM_FILE else check.value
        return io.NodeOutput(load_head(resolve_head_path(head_name), expected_family=expected))


# --- decode --------------------------------------------------------------------------------------------
def _oom_types() -> tuple:
    types = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple(t for t in types if isinstance(t, type))


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, _oom_types()):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory(vae) -> float:
    import comfy.model_management as mm

    getter = getattr(vae.patcher, "get_free_memory", None)  # newer ComfyUI (dynamic VRAM aware)
    if callable(getter):
        return getter(vae.device)
    return mm.get_free_memory(vae.device)


def _upscale(vae) -> int:
    fn = getattr(vae, "spacial_compression_decode", None)
    ratio = fn() if callable(fn) else getattr(vae, "upscale_ratio", 8)
    if not isinstance(ratio, int):
        raise ValueError(f"this VAE's spatial upscale {ratio!r} is not a plain factor; the matting head supports "
                         f"image VAEs (SD1.x/SD2 and SDXL KL-f8)")
    return ratio


def _head_extra_memory(shape, head, dtype_size: int, scale: int) -> float:
    """Bytes the head adds at full resolution (its layers and the alpha) for a latent of `shape`."""
    cfg = head.config
    per_pixel = 2 * cfg.hidden + cfg.coarse_dim * len(cfg.coarse_taps) * 2 + 2
    return shape[0] * shape[2] * shape[3] * scale * scale * per_pixel * dtype_size


def check_head_fits(vae, samples: torch.Tensor, loaded: LoadedHead):
    """(first_stage_model, decoder) when the head fits this VAE and latent; else a ValueError naming both."""
    vae.throw_exception_if_invalid()
    fsm = vae.first_stage_model
    decoder = getattr(fsm, "decoder", None)
    cfg = loaded.config
    if getattr(vae, "latent_dim", 2) != 2 or decoder is None or not hasattr(decoder, "conv_out"):
        raise ValueError(f"this VAE ({type(fsm).__name__}) is not an image KL decoder; the matting head "
                         f"{os.path.basename(loaded.path) or ''} was trained for the "
                         f"{VAE_FAMILIES[loaded.vae_family]}. Use the VAE of an SD1.x/SD2 or SDXL checkpoint.")
    if samples.shape[1] != cfg.latent_channels:
        raise ValueError(f"the latent has {samples.shape[1]} channels but the matting head was trained for the "
                         f"{VAE_FAMILIES[loaded.vae_family]} with {cfg.latent_channels}-channel latents; decode "
                         f"this latent with its own VAE and a head trained for it")
    scale = _upscale(vae)
    if scale != cfg.upscale:
        raise ValueError(f"this VAE upscales latents {scale}x, the matting head expects {cfg.upscale}x "
                         f"({VAE_FAMILIES[loaded.vae_family]})")
    conv_in = getattr(decoder.conv_out, "in_channels", cfg.fine_channels)
    if cfg.fine_tap == "conv_out:input" and conv_in != cfg.fine_channels:
        raise ValueError(f"this VAE decoder's last features have {conv_in} channels, the matting head expects "
                         f"{cfg.fine_channels} ({VAE_FAMILIES[loaded.vae_family]}); use a head trained for "
                         f"this VAE")
    names = dict(decoder.named_modules())
    for tap in cfg.taps:
        if tap.split(":")[0] not in names:
            raise ValueError(f"this VAE decoder has no module {tap.split(':')[0]!r} that the matting head reads; "
                             f"the head was trained for the {VAE_FAMILIES[loaded.vae_family]}")
    return fsm, decoder


def _decode_whole(vae, fsm, decoder, head, samples, scale):
    """Untiled decode in batch chunks sized from free memory (as core's VAE.decode does)."""
    import comfy.model_management as mm
    import comfy.utils

    dtype = vae.vae_dtype
    out_device = getattr(vae, "output_device", torch.device("cpu"))
    memory_used = (vae.memory_used_decode(samples.shape, dtype)
                   + _head_extra_memory(samples.shape, head, mm.dtype_size(dtype), scale))
    per_item = memory_used / samples.shape[0]
    mm.load_models_gpu([vae.patcher], memory_required=memory_used,
                       force_full_load=getattr(vae, "disable_offload", False))
    batch_number = max(1, int(_free_memory(vae) / per_item))
    chunks = list(range(0, samples.shape[0], batch_number))
    pbar = comfy.utils.ProgressBar(len(chunks))
    rgb_all = alpha_all = None
    with torch.no_grad(), HeadTaps(decoder, head) as taps:
        for x in chunks:
            mm.throw_exception_if_processing_interrupted()
            raw = fsm.decode(samples[x:x + batch_number].to(device=vae.device, dtype=dtype))
            alpha = taps.pop_alpha()
            rgb = vae.process_output(raw.to(device=out_device, dtype=torch.float32))
            del raw
            if rgb_all is None:
                b, (h, w) = samples.shape[0], rgb.shape[-2:]
                rgb_all = torch.empty((b, 3, h, w), device=out_device, dtype=torch.float32)
                alpha_all = torch.empty((b, h, w), device=out_device, dtype=torch.float32)
            rgb_all[x:x + batch_number] = rgb
            alpha_all[x:x + batch_number] = alpha[:, 0].to(device=out_device, dtype=torch.float32)
            del rgb, alpha
            pbar.update(1)
    return rgb_all.movedim(1, -1), alpha_all


def decode_with_head(vae, samples: torch.Tensor, loaded: LoadedHead, tiling: Tiling = Tiling.AUTO,
                     tile_size: int = 512, overlap: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb (B,H,W,3), alpha (B,H,W)) float32 on the VAE's output device, from ONE decoder pass per
    batch chunk or tile, with ComfyUI's memory management, progress bar and interruption."""
    import comfy.model_management as mm
    import comfy.utils

    if samples.ndim == 5 and samples.shape[2] == 1:
        samples = samples[:, :, 0]
    if samples.ndim != 4:
        raise ValueError(f"LATENT samples must be (B,C,H,W) image latents, got shape {tuple(samples.shape)}")
    fsm, decoder = check_head_fits(vae, samples, loaded)
    head = loaded.head
    scale = _upscale(vae)
    dtype = vae.vae_dtype
    out_device = getattr(vae, "output_device", torch.device("cpu"))
    dsize = mm.dtype_size(dtype)

    if tiling is not Tiling.ALWAYS:
        try:
            return _decode_whole(vae, fsm, decoder, head, samples, scale)
        except Exception as e:  # only out-of-memory falls back to tiles
            if tiling is Tiling.NEVER or not _is_oom(e):
                raise
            logging.warning("DiffuMatting: out of memory in the matting decode, retrying with tiles")
        mm.soft_empty_cache()

    tile = max(8, int(tile_size) // scale)
    ov = max(0, min(int(overlap) // scale, tile // 2))
    tile_shape = (1, samples.shape[1], min(tile, samples.shape[2]), min(tile, samples.shape[3]))
    memory_used = vae.memory_used_decode(tile_shape, dtype) + _head_extra_memory(tile_shape, head, dsize, scale)
    mm.load_models_gpu([vae.patcher], memory_required=memory_used,
                       force_full_load=getattr(vae, "disable_offload", False))
    pbar = comfy.utils.ProgressBar(samples.shape[0] * count_tiles(samples.shape, tile, ov))

    def on_tile():
        pbar.update(1)
        mm.throw_exception_if_processing_interrupted()

    def decode_fn(t):
        return fsm.decode(t.to(device=vae.device, dtype=dtype))

    rgbs, alphas = [], []
    with torch.no_grad():
        for i in range(samples.shape[0]):
            mm.throw_exception_if_processing_interrupted()
            out = tiled_apply(samples[i:i + 1], lambda t: decode_rgba(decode_fn, decoder, head, t), scale, tile, ov,
                              4, output_device=out_device, on_tile=on_tile)
            rgbs.append(vae.process_output(out[:, :3].clone()))
            alphas.append(out[:, 3].clamp(0.0, 1.0))
            del out
    return torch.cat(rgbs).movedim(1, -1), torch.cat(alphas)


def _greenpost(rgb: torch.Tensor, prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from ..models.greenpost import GreenPostOptions, greenpost
    except ImportError as e:
        raise RuntimeError(f"GreenPost (models/greenpost.py) is not available in this install ({e}); reinstall "
                           f"comfyui-diffumatting") from e
    fg, alpha = greenpost(rgb, prior_alpha_bhw=prior, options=GreenPostOptions())
    return fg.to(rgb), alpha.to(rgb)


class MattingVAEDecode(io.ComfyNode):
    """VAE decode that also outputs alpha: from the matting head on the decoder's features, or GreenPost."""

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingVAEDecode",
            display_name="DiffuMatting VAE Decode (RGBA)",
            category=FAMILY,
            description="Decodes a latent like VAE Decode and also gives its alpha. With a matting head, the head "
                        "reads the decoder's own features during the same single decode (no second pass) and "
                        "outputs alpha, optionally refined by GreenPost. Without a head, the decoded image is "
                        "keyed with GreenPost (green-backing keying). Large images can be decoded in tiles, "
                        "colour and alpha blended alike.",
            search_aliases=["vae decode alpha", "decode rgba", "matting decode", "transparent decode",
                            "decode with alpha", "green screen decode"],
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode (any size, any batch)."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint (SD1.x/SD2 or SDXL KL-f8 for the head)."),
                MattingHeadType.Input("head", optional=True,
                                      tooltip="Matting head from Load Matting Head. Not connected: the decoded "
                                              "image is keyed with GreenPost instead (for green-backing images)."),
                io.Boolean.Input("refine_with_greenpost", default=True,
                                 tooltip="With a head: refine its alpha with GreenPost, the head's alpha as the "
                                         "prior, and despill the colour. Without a head GreenPost always runs."),
                io.Combo.Input("tiling", options=enum_options(Tiling), default=Tiling.AUTO.value,
                               tooltip="auto: decode whole, fall back to tiles when out of memory; always: decode "
                                       "in tiles (large images, little memory); never: whole, fail when out of "
                                       "memory."),
                io.Int.Input("tile_size", default=512, min=64, max=4096, step=64,
                             tooltip="Tile size in pixels for tiled decoding."),
                io.Int.Input("tile_overlap", default=64, min=0, max=1024, step=8,
                             tooltip="Overlap of neighbouring tiles in pixels; colour and alpha are blended over "
                                     "it."),
            ],
            outputs=[
                io.Image.Output("image", display_name="image",
                                tooltip="The decoded RGB image, exactly what VAE Decode gives."),
                io.Mask.Output("alpha", display_name="alpha", tooltip=ALPHA_TIP),
                io.Image.Output("rgba", display_name="rgba",
                                tooltip="4-channel IMAGE: straight colour (despilled by GreenPost when it ran) "
                                        "and alpha; save it with Save Transparent PNG or core Save Image."),
                io.Mask.Output("transparency_mask", display_name="transparency_mask", tooltip=TMASK_TIP),
            ],
        )

    @classmethod
    def execute(cls, samples, vae, head=None, refine_with_greenpost=True, tiling=Tiling.AUTO.value,
                tile_size=512, tile_overlap=64) -> io.NodeOutput:
        latent = samples["samples"] if isinstance(samples, dict) else samples
        mode = enum_value(Tiling, tiling, "tiling")
        if head is not None:
            if not isinstance(head, LoadedHead):
                raise ValueError(f"head must come from Load Matting Head, got {type(head).__name__}")
            rgb, alpha = decode_with_head(vae, latent, head, mode, int(tile_size), int(tile_overlap))
            colour = rgb
            if refine_with_greenpost:
                colour, alpha = _greenpost(rgb, alpha)
        else:
            with torch.no_grad():
                if mode is Tiling.ALWAYS:
                    scale = _upscale(vae)
                    t = max(8, int(tile_size) // scale)
                    # core's tiled decode also runs tiles of t/2 x 2t: its overlap must stay below t/2
                    rgb = vae.decode_tiled(latent, tile_x=t, tile_y=t,
                                           overlap=max(0, min(int(tile_overlap) // scale, t // 4)))
                else:
                    rgb = vae.decode(latent)
            if rgb.ndim == 5:  # video VAEs: frames as batch
                rgb = rgb.reshape(-1, *rgb.shape[-3:])
            rgb = rgb[..., :3].float()
            colour, alpha = _greenpost(rgb, None)
        alpha = alpha.clamp(0.0, 1.0)
        rgba = torch.cat([colour[..., :3].clamp(0.0, 1.0), alpha.unsqueeze(-1)], dim=-1)
        return io.NodeOutput(rgb, alpha, rgba, 1.0 - alpha)


NODES = [HeadLoader, MattingVAEDecode]
