"""Matting-head VAE decode: colour and alpha from ONE decoder pass, plus the head file loader.

Convention (models/alpha.py): `alpha` is opacity (1 = opaque object); `transparency_mask` is core's
MASK convention (1 = transparent), i.e. 1 - alpha.
"""
from __future__ import annotations

from enum import Enum

import torch
from comfy_api.latest import io

from ..models.matting_head import LoadedHead, load_head
from ._alpha_sockets import alpha_output, transparency_mask_output
from ._files import MODEL_FOLDER, model_files, resolve_model_file
from ._schema import CATEGORY, enum_options, enum_value, schema
from ._vae_decode import Tiling, decode

FAMILY = f"{CATEGORY}/matting"
MattingHeadType = io.Custom("DIFFUMATTING_HEAD")


class FamilyCheck(str, Enum):
    FROM_FILE = "as in file"
    SD1 = "sd1"
    SDXL = "sdxl"


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


# --- decode (orchestration in _vae_decode.py) -----------------------------------------------------
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
                alpha_output(),
                io.Image.Output("rgba", display_name="rgba",
                                tooltip="4-channel IMAGE: straight colour (despilled by GreenPost when it ran) "
                                        "and alpha; save it with Save Transparent PNG or core Save Image."),
                transparency_mask_output(),
            ],
        )

    @classmethod
    def execute(cls, samples, vae, head=None, refine_with_greenpost=True, tiling=Tiling.AUTO.value,
                tile_size=512, tile_overlap=64) -> io.NodeOutput:
        latent = samples["samples"] if isinstance(samples, dict) else samples
        mode = enum_value(Tiling, tiling, "tiling")
        if head is not None and not isinstance(head, LoadedHead):
            raise ValueError(f"head must come from Load Matting Head, got {type(head).__name__}")
        rgb, alpha = decode(vae, latent, head, mode, int(tile_size), int(tile_overlap))
        colour = rgb
        if head is None or refine_with_greenpost:
            colour, alpha = _greenpost(rgb, alpha)
        alpha = alpha.clamp(0.0, 1.0)
        rgba = torch.cat([colour[..., :3].clamp(0.0, 1.0), alpha.unsqueeze(-1)], dim=-1)
        return io.NodeOutput(rgb, alpha, rgba, 1.0 - alpha)


NODES = [HeadLoader, MattingVAEDecode]
