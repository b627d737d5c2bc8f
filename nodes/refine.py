"""GreenPost refinement node: key a green-screen IMAGE (optionally refining a predicted alpha).

Outputs follow the pack's convention (models/alpha.py): `alpha` is opacity (1 = opaque object),
`transparency_mask` is core's LoadImage / JoinImageWithAlpha convention (1 = transparent).
"""
from __future__ import annotations


import logging

import torch
from comfy_api.latest import io, ui

from ..models.alpha import parse_hex_color
from ..models.greenpost import OPTION_DOCS, GreenPostOptions, KeyMode, RefinerChoice, greenpost
from ._alpha_sockets import alpha_output, transparency_mask_output
from ._schema import CATEGORY, enum_options, enum_value, schema

FAMILY = f"{CATEGORY}/refine"



def _options(key_mode, key_color, spill_strength, edge_detail, clip_black, clip_white,
             refiner=RefinerChoice.SHIPPED.value) -> GreenPostOptions:
    mode = enum_value(KeyMode, key_mode, "key_mode")
    key = parse_hex_color(key_color) if mode is KeyMode.PICKED else None
    return GreenPostOptions(key_color=key, spill_strength=float(spill_strength), edge_detail=float(edge_detail),
                            clip_black=float(clip_black), clip_white=float(clip_white),
                            refiner=enum_value(RefinerChoice, refiner, "refiner").value)


class GreenPost(io.ComfyNode):
    """Key green-screen images to straight foreground + alpha (GreenPost)."""

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingGreenPost",
            display_name="GreenPost (green-screen refine)",
            category=FAMILY,
            description="Keys images on a green backing (photographed or generated) to a straight, despilled "
                        "foreground and its alpha. The backing is estimated from the image itself (uneven light, "
                        "shadows), so it need not be flat. Optionally refines an alpha a network predicted.",
            search_aliases=["chroma key", "green screen", "keyer", "remove green background", "despill",
                            "greenscreen", "matte", "background removal"],
            inputs=[
                io.Image.Input("image", tooltip="Green-screen image(s): RGB, or RGBA (its alpha multiplies the "
                                                "result) or grey. Any size, any batch."),
                io.Mask.Input("alpha_prior", optional=True,
                              tooltip="Optional alpha predicted by a network, e.g. DiffuMatting VAE Decode's "
                                      "`alpha` (1 = opaque object; NOT core's LoadImage mask, which is "
                                      "1 = transparent). Used as seeds, as a garbage matte and where the "
                                      "colours cannot tell object from backing."),
                io.Combo.Input("key_mode", options=enum_options(KeyMode), default=KeyMode.AUTO.value,
                               tooltip="auto: estimate the backing colour from the image; picked: use key_color."),
                io.String.Input("key_color", default="#00b140",
                                tooltip="Backing colour as #RRGGBB, used when key_mode is 'picked'. "
                                        + OPTION_DOCS["key_color"].split(". ", 1)[1]),
                io.Float.Input("spill_strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip=OPTION_DOCS["spill_strength"]),
                io.Float.Input("edge_detail", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip=OPTION_DOCS["edge_detail"]),
                io.Float.Input("clip_black", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip=OPTION_DOCS["clip_black"]),
                io.Float.Input("clip_white", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip=OPTION_DOCS["clip_white"]),
                io.Combo.Input("refiner", options=enum_options(RefinerChoice), default=RefinerChoice.SHIPPED.value,
                               optional=True,  # added after 0.1: saved API prompts without it keep working
                               tooltip=OPTION_DOCS["refiner"]),
            ],
            outputs=[
                io.Image.Output("foreground", display_name="foreground",
                                tooltip="Straight (not premultiplied) RGB of the object with the green spill "
                                        "removed; use it with `alpha`."),
                alpha_output(),
                io.Image.Output("rgba", display_name="rgba",
                                tooltip="4-channel IMAGE: the straight foreground and alpha; save it with Save "
                                        "Transparent PNG."),
                transparency_mask_output(),
            ],
        )

    @classmethod
    def validate_inputs(cls, key_color=None):
        """key_color's syntax, at queue time. Naming only key_color keeps ComfyUI's own range and option
        checks on the other inputs and gives one message; a grey picked key and clip_black >= clip_white
        are refused when the node runs (GreenPostOptions), since they involve two inputs."""
        if key_color is not None:
            try:
                parse_hex_color(key_color)
            except ValueError as e:
                return f"{e} (key_color is used when key_mode is 'picked')"
        return True

    @classmethod
    def execute(cls, image, alpha_prior=None, key_mode=KeyMode.AUTO.value, key_color="#00b140",
                spill_strength=1.0, edge_detail=0.5, clip_black=0.0,
                clip_white=1.0, refiner=RefinerChoice.SHIPPED.value) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        opts = _options(key_mode, key_color, spill_strength, edge_detail, clip_black, clip_white, refiner)
        if image.ndim == 3:
            image = image[None]
        n = image.shape[0]
        if alpha_prior is not None:
            if alpha_prior.ndim == 2:
                alpha_prior = alpha_prior[None]
            if alpha_prior.ndim != 3 or alpha_prior.shape[0] not in (1, n):
                raise ValueError(f"alpha_prior has shape {tuple(alpha_prior.shape)}: expected one mask or {n} "
                                 f"(one per image) of the image's size")
        device = comfy.model_management.get_torch_device()
        out_device = comfy.model_management.intermediate_device()
        pbar = comfy.utils.ProgressBar(n)
        fgs, alphas, warnings = [], [], []
        for i in range(n):
            comfy.model_management.throw_exception_if_processing_interrupted()
            prior = None if alpha_prior is None else alpha_prior[min(i, alpha_prior.shape[0] - 1)][None].to(device)
            warned = []
            fg, a = greenpost(image[i:i + 1].to(device), prior, opts, warnings=warned)
            warnings += [m if n == 1 else f"image {i + 1} of {n}: {m}" for m in warned]
            fgs.append(fg.to(out_device))
            alphas.append(a.to(out_device))
            pbar.update(1)
        fg = torch.cat(fgs)
        alpha = torch.cat(alphas).clamp(0.0, 1.0)
        rgba = torch.cat([fg, alpha.unsqueeze(-1)], dim=-1)
        for m in warnings:
            logging.warning("DiffuMatting GreenPost: %s", m)
        shown = ui.PreviewText("\n".join(warnings)) if warnings else None
        return io.NodeOutput(fg, alpha, rgba, 1.0 - alpha, ui=shown)


NODES = [GreenPost]
