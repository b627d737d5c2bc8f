"""Generation nodes: DiffuMatting UNet loader, green-canvas prompt, training-free green canvas.

The ComfyUI-specific parts (file lookup, diffusers key maps, ModelPatcher patches, VAE encode) live here;
the math is in models/unet_layout.py, models/prompting.py and models/green_canvas.py.
"""
from __future__ import annotations

import json
import os

import torch
from comfy_api.latest import io

from ..models import green_canvas
from ..models.prompting import DEFAULT_GREEN_PHRASE, GREEN_WORD, add_green_phrase, green_token_positions
from ..models.unet_layout import Layout, check_compatible, detect_layout, to_ldm
from ..models.model_files import check_model_name
from ._files import model_files, resolve_model_file
from ._green_kv import GREEN_TOKENS_KEY, positions_of, splice_green
from ._schema import CATEGORY, enum_options, schema

FAMILY = f"{CATEGORY}/generate"
UNET_FOLDERS = ("diffumatting", "diffusion_models")
UNET_PREFIX = "diffusion_model."


# --- files ---------------------------------------------------------------------------------------------
def unet_files() -> list[str]:
    """UNet candidates: .safetensors in models/diffumatting, then in models/diffusion_models."""
    return model_files(*UNET_FOLDERS)


# --- UNet loader ---------------------------------------------------------------------------------------
def base_unet_shapes(model) -> dict[str, torch.Size]:
    """ldm key -> shape of the MODEL's UNet (no copies)."""
    sd = model.model.state_dict()
    return {k[len(UNET_PREFIX):]: v.shape for k, v in sd.items() if k.startswith(UNET_PREFIX)}


def diffusers_key_map(model) -> dict[str, str]:
    """diffusers UNet key -> ldm key, for the MODEL's UNet config (ComfyUI's own map)."""
    import comfy.utils

    unet_config = getattr(model.model.model_config, "unet_config", None)
    if not unet_config:
        raise ValueError("the MODEL has no UNet config, so a diffusers-layout file cannot be mapped onto it")
    return comfy.utils.unet_to_diffusers(unet_config)


def load_unet_weights(path: str, model) -> tuple[dict[str, torch.Tensor], Layout, str]:
    """The UNet weights of `path` with ldm keys, checked against `model`; (weights, layout, architecture)."""
    import comfy.utils

    name = check_model_name(os.path.basename(path), "UNet", "models/diffumatting")
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:  # a truncated or foreign file: name it
        raise ValueError(f"cannot read UNet file {name!r}: {e}") from e
    try:
        layout, prefix = detect_layout(sd.keys())
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from e
    dmap = diffusers_key_map(model) if layout is Layout.DIFFUSERS else None
    weights = to_ldm(sd, layout, prefix, dmap)
    refuse_non_finite(weights, f"UNet file {name!r}")
    arch = check_compatible({k: v.shape for k, v in weights.items()}, base_unet_shapes(model), name=repr(name))
    return weights, layout, arch


def refuse_non_finite(weights: dict[str, torch.Tensor], what: str) -> None:
    """A ValueError naming the tensors of `weights` that hold NaN or Inf (they would make every image NaN)."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what}: {len(bad)} of {len(weights)} weight tensors hold NaN or infinite values (e.g. "
                         f"{bad[:3]}): training diverged or the file is damaged; use an earlier checkpoint")


def unet_patches(weights: dict[str, torch.Tensor], strength: float) -> tuple[dict, float, float]:
    """(patches, strength_patch, strength_model) for ModelPatcher.add_patches.

    Strength 1 replaces each weight: a "set" patch, which core's calculate_weight applies as one copy (ComfyUI
    0.3.75 and the newest both read ("set", (tensor,)) that way), so nothing is recomputed as a full-size
    difference per layer. Below 1 the weights blend: a "diff" patch at `strength` on the base scaled by
    (1 - strength).
    """
    if strength == 1.0:
        return {UNET_PREFIX + k: ("set", (v,)) for k, v in weights.items()}, 1.0, 1.0
    return {UNET_PREFIX + k: (v,) for k, v in weights.items()}, strength, 1.0 - strength


def apply_unet(model, weights: dict[str, torch.Tensor], strength: float):
    """A clone of `model` whose UNet is (1 - strength) * base + strength * weights (ComfyUI patches)."""
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength {strength} is outside 0..1 (0 = base model, 1 = the DiffuMatting UNet)")
    m = model.clone()
    if strength == 0.0:
        return m
    patches, strength_patch, strength_model = unet_patches(weights, strength)
    added = m.add_patches(patches, strength_patch=strength_patch, strength_model=strength_model)
    if len(added) != len(patches):
        missing = sorted(set(patches) - set(added))[:3]
        raise ValueError(f"{len(patches) - len(added)} UNet weights could not be patched (e.g. {missing})")
    return m


class UNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingUNetLoader",
            display_name="Load DiffuMatting UNet",
            category=FAMILY,
            description="Puts a DiffuMatting UNet (fine-tuned to paint objects on a flat green canvas) on top "
                        "of a checkpoint's MODEL. Reads ComfyUI/ldm, diffusers and full-checkpoint layouts from "
                        ".safetensors; returns a patched clone (the loaded checkpoint stays untouched). "
                        "strength blends the weights: 0 = base model, 1 = the DiffuMatting UNet.",
            search_aliases=["diffumatting unet", "green screen unet", "load unet", "finetuned unet",
                            "transparent generation"],
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL from the checkpoint the UNet was fine-tuned from "
                                                "(same architecture: SD1.x on SD1.x, SDXL on SDXL)."),
                io.Combo.Input("unet_name", options=unet_files(),
                               tooltip="UNet file (.safetensors) in models/diffumatting or models/diffusion_models."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Weight blend: 0 = the base model unchanged, 1 = the full DiffuMatting "
                                       "UNet, in between a linear mix of the weights."),
            ],
            outputs=[io.Model.Output("MODEL", display_name="MODEL",
                                     tooltip="A clone of the MODEL with the DiffuMatting UNet patched in.")],
        )

    @classmethod
    def validate_inputs(cls, unet_name=None):  # only what it checks: core checks the rest
        if unet_name is not None:
            try:
                resolve_model_file(unet_name, UNET_FOLDERS, "UNet")
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, model, unet_name, strength=1.0) -> io.NodeOutput:
        path = resolve_model_file(unet_name, UNET_FOLDERS, "UNet")
        weights, _, _ = load_unet_weights(path, model)
        return io.NodeOutput(apply_unet(model, weights, strength))


# --- green prompt -------------------------------------------------------------------------------------
def _ids(chunk) -> list:
    return [t[0] for t in chunk]


def green_tokens(clip, tokens: dict, word: str = GREEN_WORD) -> dict[str, list[int]]:
    """Per text encoder ("l", "g", ...): positions of the tokens spelling `word` in the encoded sequence
    (chunks of the tokenizer concatenated, as the conditioning tensor is)."""
    empty = clip.tokenize("")
    bare = clip.tokenize(word)
    out = {}
    for key, chunks in tokens.items():
        if key not in bare:
            continue
        special = {t for t in _ids(empty.get(key, [[]])[0]) if isinstance(t, int)}
        word_ids = [t for t in _ids(bare[key][0]) if isinstance(t, int) and t not in special]
        if not word_ids:
            continue
        positions, offset = [], 0
        for chunk in chunks:
            ids = [t if isinstance(t, int) else -1 for t in _ids(chunk)]
            positions += [offset + p for p in green_token_positions(ids, word_ids)]
            offset += len(chunk)
        out[key] = positions
    return out


class GreenPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingGreenPrompt",
            display_name="Green Canvas Prompt",
            category=FAMILY,
            description="Text encode (any CLIP: SD1.x, SDXL's CLIP-L + CLIP-G, Flux's CLIP-L + T5) that appends "
                        "the green-screen phrase the DiffuMatting UNet was trained with, so the prompt asks for "
                        "a flat green backing.",
            search_aliases=["green prompt", "green screen prompt", "text encode green", "clip green"],
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder(s) of the checkpoint."),
                io.String.Input("text", multiline=True, default="a ceramic mug, studio product photo",
                                tooltip="What to paint; the green-screen phrase is appended."),
                io.String.Input("green_phrase", default=DEFAULT_GREEN_PHRASE,
                                tooltip="Appended to the text unless already present; keep the trainer's phrase "
                                        "for a DiffuMatting UNet. Empty = append nothing."),
            ],
            outputs=[
                io.Conditioning.Output("conditioning", display_name="conditioning",
                                       tooltip="The encoded prompt (core's encode of the full text), with the "
                                               "positions of the word 'green' recorded for the LoRA stack's "
                                               "green token k/v protection."),
                io.String.Output("prompt", display_name="prompt", tooltip="The full text that was encoded."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, green_phrase=DEFAULT_GREEN_PHRASE) -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip is None: the checkpoint has no text encoder; load one with a CLIP loader")
        full = add_green_phrase(text, green_phrase)
        tokens = clip.tokenize(full)
        positions = green_tokens(clip, tokens)
        cond = clip.encode_from_tokens_scheduled(tokens)
        cond = splice_green(cond, clip, tokens, positions_of({GREEN_TOKENS_KEY: positions}))
        cond = [[c, {**extra, GREEN_TOKENS_KEY: positions}] for c, extra in cond]
        return io.NodeOutput(cond, full)


# --- training-free green canvas ---------------------------------------------------------------------------
def key_colour_latent(vae, model, rgb: tuple[float, float, float], size: int = 64) -> torch.Tensor:
    """The key colour's latent (C,) in the MODEL's latent space (VAE encode, mean, process_in)."""
    img = torch.tensor(rgb, dtype=torch.float32).view(1, 1, 1, 3).expand(1, size, size, 3).contiguous()
    with torch.no_grad():
        lat = vae.encode(img)
    mean = green_canvas.key_latent_mean(lat)
    shaped = mean.view(1, -1, *([1] * (lat.ndim - 2)))
    return model.model.process_latent_in(shaped).flatten().float().detach()


def green_canvas_model(model, vae, key_color: str, strength: float, end_percent: float, region: dict,
                       mode: green_canvas.CanvasMode = green_canvas.CanvasMode.FOLLOW):
    """A clone of `model` whose sampler pulls x0 toward the key colour in the background: found in each
    step's x0 prediction (FOLLOW) or outside the fixed ellipse `region` (ELLIPSE)."""
    rgb = green_canvas.hex_to_rgb(key_color)
    mode = green_canvas.CanvasMode(mode)
    green_canvas.background_weight(8, 8, **region)  # validates the region early (also kept in follow mode)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength {strength} must be in 0..1")
    if not 0.0 <= end_percent <= 1.0:
        raise ValueError(f"end_percent {end_percent} must be in 0..1")
    key = key_colour_latent(vae, model, rgb)
    sigma_end = float(model.get_model_object("model_sampling").percent_to_sigma(end_percent))
    m = model.clone()
    if strength > 0 and end_percent > 0:
        m.set_model_sampler_post_cfg_function(green_canvas.GreenCanvasGuide(key, strength, sigma_end, region, mode))
    return m


class GreenCanvas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingGreenCanvas",
            display_name="Green Canvas (training-free)",
            category=FAMILY,
            description="Makes any checkpoint (SD1.x, SDXL, Flux, ...) paint the object on a flat key-colour "
                        "backing, without DiffuMatting weights: while sampling, the model's clean-image "
                        "prediction is pulled toward the key colour's latent in the background. 'follow object' "
                        "finds the background in the model's own prediction at every step (any size, position, "
                        "several objects); 'fixed ellipse' uses the region below (after TKG-DM). Use with "
                        "KSampler; prompt for an object on a green screen.",
            search_aliases=["green screen", "green background", "chroma key background", "tkg-dm",
                            "transparent generation", "green canvas"],
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to sample with (cloned, not changed)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, used once to encode the key colour."),
                io.Combo.Input("mode", options=enum_options(green_canvas.CanvasMode), default=green_canvas.CanvasMode.FOLLOW.value,
                               tooltip="follow object: the background is read from the model's prediction at "
                                       "every step, the object is left alone wherever it is. fixed ellipse: "
                                       "everything outside the ellipse below is background (use strength ~0.8, "
                                       "end_percent ~0.35 so objects outside it are not painted over)."),
                io.String.Input("key_color", default="#00b140",
                                tooltip="Backing colour as hex (#00b140 = chroma-key green)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How far the background prediction is pulled toward the key colour in "
                                       "the guided steps (0 = off, 1 = replaced)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Guide while sampling is before this fraction of the schedule (1 = every "
                                       "step). Later steps are the model's own."),
                io.Float.Input("center_x", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="fixed ellipse: centre of the object region, fraction of the width."),
                io.Float.Input("center_y", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="fixed ellipse: centre of the object region, fraction of the height."),
                io.Float.Input("width", default=0.6, min=0.05, max=2.0, step=0.01,
                               tooltip="fixed ellipse: width of the object region (fraction of the width)."),
                io.Float.Input("height", default=0.7, min=0.05, max=2.0, step=0.01,
                               tooltip="fixed ellipse: height of the object region (fraction of the height)."),
                io.Float.Input("feather", default=0.15, min=0.0, max=1.0, step=0.01,
                               tooltip="fixed ellipse: softness of the region's edge (fraction of the smaller "
                                       "side)."),
            ],
            outputs=[io.Model.Output("MODEL", display_name="MODEL",
                                     tooltip="A clone of the MODEL with the green-canvas guidance attached.")],
        )

    @classmethod
    def validate_inputs(cls, key_color=None):  # only what it checks: core checks the rest
        if key_color is not None:
            try:
                green_canvas.hex_to_rgb(key_color)
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, model, vae, mode=green_canvas.CanvasMode.FOLLOW.value, key_color="#00b140", strength=1.0,
                end_percent=1.0, center_x=0.5, center_y=0.5, width=0.6, height=0.7,
                feather=0.15) -> io.NodeOutput:
        region = dict(center_x=center_x, center_y=center_y, width=width, height=height, feather=feather)
        return io.NodeOutput(green_canvas_model(model, vae, key_color, strength, end_percent, region,
                                                green_canvas.CanvasMode(str(mode))))


NODES = [UNetLoader, GreenPrompt, GreenCanvas]
