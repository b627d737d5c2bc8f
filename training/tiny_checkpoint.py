"""A tiny SD1.5-shaped checkpoint and random kohya LoRAs, built with ComfyUI's own classes.

`build_tiny_sd15_checkpoint(path)` (what `train.py --preset tiny` trains on) writes a full checkpoint that ComfyUI's model detection reads as SD1.5:
a UNet with model_channels 320 and context_dim 768 but ONE level with ONE res block (and one transformer
block per position), the full CLIP-L text model (its size is fixed by ComfyUI's config file, not by the
weights) and the SD1.x KL-f8 VAE (ComfyUI reads its channel counts from a fixed config, so it cannot be
smaller). Weights are seeded random numbers (fan-in scaled, unit norms, zero biases), stored in float16.

The module imports ComfyUI: call it with ComfyUI importable (the trainer's `training.host.import_comfy`, the
tests' `comfy_host` fixture). Test-only builders on top of it (fine-tuned UNets, random LoRAs, a server's
model folder) live in tests/support/tiny_sd15.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

TINY_UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_linear_in_transformer": False, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "use_temporal_resblock": False, "use_temporal_attention": False,
}
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                   "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                   "dropout": 0.0}
SAVE_DTYPE = torch.float16


def _meta_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def unet_shapes() -> dict[str, torch.Size]:
    """Shapes of the tiny UNet's state dict (ldm keys without prefix)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(TINY_UNET_CONFIG)
    with torch.device("meta"):
        unet = UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
    return _meta_shapes(unet)


def clip_l_shapes() -> dict[str, torch.Size]:
    """Shapes of ComfyUI's CLIP-L text model, keys as in SD1.x checkpoints (`transformer.text_model.*`)."""
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    cfg_path = Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")
    config = json.loads(cfg_path.read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return {f"transformer.{k}": s for k, s in _meta_shapes(model).items()}


def vae_shapes() -> dict[str, torch.Size]:
    import comfy.ops  # noqa: F401  (AutoencoderKL builds from comfy ops)
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    return _meta_shapes(vae)


def _random_tensor(key: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    parts = key.split(".")
    leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
    if leaf == "position_ids":
        return torch.arange(shape[-1]).expand(shape).clone()
    is_norm = ("norm" in owner or owner.startswith("ln") or re.fullmatch(r"in_layers\.0|out_layers\.0|out\.0",
               ".".join(parts[-3:-1])) is not None)
    if is_norm and leaf == "weight":
        return torch.ones(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    if "embedding" in owner:  # token / position embeddings
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
    return torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5


def random_state_dict(shapes: dict[str, torch.Size], seed: int, prefix: str = "",
                      dtype: torch.dtype = SAVE_DTYPE) -> dict[str, torch.Tensor]:
    """Seeded random weights for `shapes` (keys in sorted order, so the result depends only on the seed)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(shapes):
        t = _random_tensor(k, shapes[k], gen)
        out[prefix + k] = t if k.endswith("position_ids") else t.to(dtype)
    return out


def tiny_sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The full checkpoint state dict (model.diffusion_model.*, cond_stage_model.*, first_stage_model.*)."""
    sd = {}
    sd.update(random_state_dict(unet_shapes(), seed, "model.diffusion_model."))
    sd.update(random_state_dict(clip_l_shapes(), seed + 1, "cond_stage_model."))
    sd.update(random_state_dict(vae_shapes(), seed + 2, "first_stage_model."))
    return sd


def save_safetensors_atomic(sd: dict[str, torch.Tensor], path, metadata: dict | None = None) -> Path:
    """Save a state dict as .safetensors through a temporary file and a rename."""
    from safetensors.torch import save_file

    from ..models.atomic import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    return path


def build_tiny_sd15_checkpoint(path, seed: int = 0) -> Path:
    """Write the tiny SD1.5-shaped checkpoint to `path` (.safetensors) and return the path."""
    sd = tiny_sd15_state_dict(seed)
    return save_safetensors_atomic(sd, path, {"diffumatting": "tiny SD1.5-shaped test checkpoint, random weights",
                                               "seed": str(seed)})
