"""Tiny checkpoints of other model families, built with ComfyUI's own classes and key conversions.

- SDXL: a full checkpoint (UNet + CLIP-L + CLIP-G + KL-f8 VAE) that ComfyUI's model detection reads as
  `SDXL`: the UNet keeps what SDXL's detection matches (model_channels 320, linear transformer input,
  transformer_depth [0, 0, 2, 2, 10, 10], context 2048, adm 2816) but every level has 320 channels and the
  output and middle blocks one transformer each. The text encoders are the real CLIP-L and CLIP-G
  architectures (ComfyUI reads their size from fixed config files), the VAE is the SD KL-f8 one. The
  checkpoint keys are what ComfyUI itself writes when it saves an SDXL checkpoint (its
  `process_*_state_dict_for_saving` conversions, CLIP-G in the open_clip layout).

Weights are seeded random numbers (the same recipe as training/tiny_checkpoint.py), stored in float16.
Needs ComfyUI importable (the tests' `comfy_host` fixture).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from diffumatting.training.tiny_checkpoint import (_meta_shapes, clip_l_shapes, random_state_dict,
                                                   save_safetensors_atomic, vae_shapes)

TINY_SDXL_UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "context_dim": 2048, "num_heads": -1, "num_head_channels": 64, "use_linear_in_transformer": True,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}


def sdxl_unet_shapes() -> dict[str, torch.Size]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**TINY_SDXL_UNET_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)
    return _meta_shapes(unet)


def clip_g_shapes() -> dict[str, torch.Size]:
    """ComfyUI's CLIP-G (bigG) text model, keys `transformer.text_model.*` / `transformer.text_projection`."""
    import comfy.clip_model
    import comfy.ops

    config = json.loads((Path(comfy.clip_model.__file__).parent / "clip_config_bigg.json").read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return {f"transformer.{k}": s for k, s in _meta_shapes(model).items()}


def tiny_sdxl_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny SDXL checkpoint's state dict, converted for saving by ComfyUI's SDXL model config."""
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET_CONFIG))
    clip = {}
    clip.update(random_state_dict(clip_l_shapes(), seed + 1, "clip_l."))
    clip.update(random_state_dict(clip_g_shapes(), seed + 3, "clip_g."))
    sd = {}
    sd.update(config.process_unet_state_dict_for_saving(random_state_dict(sdxl_unet_shapes(), seed)))
    sd.update(config.process_clip_state_dict_for_saving(clip))
    sd.update(config.process_vae_state_dict_for_saving(random_state_dict(vae_shapes(), seed + 2)))
    return {k: v.contiguous() for k, v in sd.items()}


def build_tiny_sdxl_checkpoint(path, seed: int = 0) -> Path:
    return save_safetensors_atomic(tiny_sdxl_state_dict(seed), path,
                                   {"diffumatting": "tiny SDXL-detected test checkpoint, random weights",
                                    "seed": str(seed)})


def detected_model_class(path) -> str:
    """The class name of the model config ComfyUI's detection picks for a checkpoint file."""
    import comfy.model_detection
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    return type(config).__name__ if config is not None else "None"


def sdxl_kohya_name_map(te_layers: int = 2) -> dict[str, tuple[str, torch.Size]]:
    """kohya module names of an SDXL LoRA for the tiny SDXL checkpoint: every attention projection of the
    UNet (self and cross), and the attention/MLP weights of the first `te_layers` layers of CLIP-L (te1) and
    CLIP-G (te2)."""
    import re

    import comfy.utils

    out = {}
    shapes = sdxl_unet_shapes()
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(dict(TINY_SDXL_UNET_CONFIG)).items():
        if ".attn" in diffusers_key and diffusers_key.endswith(".weight") and ldm_key in shapes \
                and len(shapes[ldm_key]) == 2:
            out["lora_unet_" + diffusers_key[:-len(".weight")].replace(".", "_")] = ("diffusion_model." + ldm_key,
                                                                                      shapes[ldm_key])
    pattern = re.compile(r"transformer\.text_model\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
                         r"\.weight$")
    for te, te_shapes in (("te1", clip_l_shapes()), ("te2", clip_g_shapes())):
        for k, shape in te_shapes.items():
            m = pattern.match(k)
            if m and int(m.group(1)) < te_layers:
                out[f"lora_{te}_text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"] = (k, shape)
    return out


def write_random_sdxl_lora(path, seed: int, **kw) -> Path:
    from support.tiny_sd15 import random_kohya_lora

    return save_safetensors_atomic(random_kohya_lora(seed, name_map=sdxl_kohya_name_map(), **kw), path,
                                   {"ss_network_module": "networks.lora", "diffumatting": "random SDXL test LoRA"})
