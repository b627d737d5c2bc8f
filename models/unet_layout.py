"""Key layouts of fine-tuned UNet files and architecture detection (plain torch).

Layouts (what a DiffuMatting UNet file may look like):
- LDM:        bare ldm keys, `input_blocks.0.0.weight` ... (ComfyUI's "diffusion_models" UNet files)
- COMFY:      `diffusion_model.input_blocks...` (ComfyUI's BaseModel state dict, the trainer's output)
- CHECKPOINT: `model.diffusion_model.input_blocks...` (a full checkpoint; other parts are ignored)
- DIFFUSERS:  `conv_in.weight`, `down_blocks.0...` (diffusers UNet2DConditionModel), optionally under
              `unet.`; converted with a diffusers->ldm key map the caller supplies (ComfyUI builds it
              from the base model's UNet config with comfy.utils.unet_to_diffusers).
"""
from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

import torch


class Layout(str, Enum):
    LDM = "ldm"
    COMFY = "comfy"
    CHECKPOINT = "checkpoint"
    DIFFUSERS = "diffusers"


PREFIXES = {Layout.CHECKPOINT: "model.diffusion_model.", Layout.COMFY: "diffusion_model.", Layout.LDM: ""}
_LDM_MARKER = "input_blocks.0.0.weight"
_DIFFUSERS_MARKER = "conv_in.weight"


def detect_layout(keys) -> tuple[Layout, str]:
    """(layout, key prefix) of a UNet state dict, from its keys; ValueError when none fits."""
    keys = list(keys)
    keyset = set(keys)
    for layout in (Layout.CHECKPOINT, Layout.COMFY, Layout.LDM):
        if PREFIXES[layout] + _LDM_MARKER in keyset:
            return layout, PREFIXES[layout]
    for prefix in ("", "unet.", "model.", "diffusion_model."):
        if prefix + _DIFFUSERS_MARKER in keyset and any(k.startswith(prefix + "down_blocks.") for k in keys):
            return Layout.DIFFUSERS, prefix
    sample = ", ".join(sorted(keys)[:5]) or "(no keys)"
    raise ValueError("not a UNet file: found neither ldm keys (input_blocks.0.0.weight, optionally under "
                     "diffusion_model. or model.diffusion_model.) nor diffusers keys (conv_in.weight, "
                     f"down_blocks.*); first keys: {sample}")


def to_ldm(sd: Mapping[str, torch.Tensor], layout: Layout, prefix: str,
           diffusers_map: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The UNet weights of `sd` with bare ldm keys.

    Keys outside the UNet prefix (a checkpoint's VAE/CLIP) are dropped. For DIFFUSERS, `diffusers_map`
    maps diffusers keys to ldm keys; a diffusers key it does not know is an error (the file is for another
    UNet shape than the map's).
    """
    if layout is Layout.DIFFUSERS:
        if diffusers_map is None:
            raise ValueError("a diffusers-layout UNet needs the diffusers->ldm key map of the base model")
        out, unknown = {}, []
        for k, v in sd.items():
            if not k.startswith(prefix):
                continue
            name = k[len(prefix):]
            target = diffusers_map.get(name)
            if target is None:
                unknown.append(name)
            else:
                out[target] = v
        if unknown:
            raise ValueError(f"{len(unknown)} diffusers keys have no counterpart in the base model's UNet "
                             f"(e.g. {', '.join(sorted(unknown)[:4])}): the file is for a different UNet")
        return out
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def detect_architecture(shapes: Mapping[str, object]) -> str:
    """Architecture name of an ldm UNet from its key shapes: "SD1.x", "SD2.x", "SDXL", "SDXL refiner",
    or "unknown (...)" with the figures read."""
    context = None
    for k, v in shapes.items():
        if k.endswith("attn2.to_k.weight"):
            context = _shape(v)[1]
            break
    adm = _shape(shapes["label_emb.0.0.weight"])[1] if "label_emb.0.0.weight" in shapes else None
    channels = _shape(shapes[_LDM_MARKER])[0] if _LDM_MARKER in shapes else None
    if adm is None and context == 768:
        return "SD1.x"
    if adm is None and context == 1024:
        return "SD2.x"
    if adm == 2816 and context == 2048:
        return "SDXL"
    if adm == 2560 and context == 1280:
        return "SDXL refiner"
    return f"unknown (context_dim={context}, adm_in_channels={adm}, model_channels={channels})"


def check_compatible(file_shapes: Mapping[str, object], base_shapes: Mapping[str, object], name: str = "file",
                     expected: str | None = None) -> str:
    """Refuse a UNet that does not fit the base model; returns the detected architecture.

    Errors name the detected and the expected architecture, and the first keys that do not match.
    """
    detected = detect_architecture(file_shapes)
    expected = expected or detect_architecture(base_shapes)
    if detected != expected:
        raise ValueError(f"{name} is a {detected} UNet but the MODEL is {expected}: load it on a {detected} "
                         f"checkpoint, or pick a DiffuMatting UNet trained for {expected}")
    unknown = [k for k in file_shapes if k not in base_shapes]
    wrong = [k for k in file_shapes if k in base_shapes and _shape(file_shapes[k]) != _shape(base_shapes[k])]
    if unknown or wrong:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} keys the base UNet lacks (e.g. {', '.join(sorted(unknown)[:3])})")
        if wrong:
            k = sorted(wrong)[0]
            parts.append(f"{len(wrong)} keys with other shapes (e.g. {k}: {_shape(file_shapes[k])} in the file, "
                         f"{_shape(base_shapes[k])} in the model)")
        raise ValueError(f"{name} ({detected}) does not fit the MODEL's UNet ({expected}): " + "; ".join(parts)
                         + ". Both say the same architecture, so the file is probably a different variant "
                           "(e.g. inpainting) or truncated")
    if not file_shapes:
        raise ValueError(f"{name} holds no UNet weights")
    return detected
