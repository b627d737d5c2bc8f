"""A tiny SD1.5-shaped checkpoint and random kohya LoRAs, built with ComfyUI's own classes.

`build_tiny_sd15_checkpoint(path)` writes a full checkpoint that ComfyUI's model detection reads as SD1.5:
a UNet with model_channels 320 and context_dim 768 but ONE level with ONE res block (and one transformer
block per position), the full CLIP-L text model (its size is fixed by ComfyUI's config file, not by the
weights) and the SD1.x KL-f8 VAE (ComfyUI reads its channel counts from a fixed config, so it cannot be
smaller). Weights are seeded random numbers (fan-in scaled, unit norms, zero biases), stored in float16.

The module imports ComfyUI: call it with ComfyUI importable (the tests' `comfy_host` fixture, or from
inside a running ComfyUI).
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


def cached_tiny_sd15_checkpoint(folder, seed: int = 0) -> Path:
    """`folder`/tiny_sd15_seed<seed>.safetensors, built on first use (for test sessions)."""
    path = Path(folder) / f"tiny_sd15_seed{seed}.safetensors"
    if not path.is_file():
        build_tiny_sd15_checkpoint(path, seed)
    return path


# --- fine-tuned UNets and LoRAs for tests ---------------------------------------------------------------
def tiny_unet_finetune(seed: int = 1, base_seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' tiny UNet: the base checkpoint's UNet (seed `base_seed`) plus seeded perturbations.

    Keys are ldm keys without prefix (input_blocks.0.0.weight ...), float16.
    """
    shapes = unet_shapes()
    base = random_state_dict(shapes, base_seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    out = {}
    for k in sorted(base):
        w = base[k].float()
        std = float(w.std()) if w.numel() > 1 else 0.0
        out[k] = (w + scale * max(std, 1e-3) * torch.randn(w.shape, generator=gen)).to(SAVE_DTYPE)
    return out


def _kohya_name_map() -> dict[str, tuple[str, torch.Size]]:
    """kohya LoRA module name (lora_unet_* / lora_te_*) -> (checkpoint key of its weight, weight shape)."""
    import comfy.utils

    out = {}
    diff_map = comfy.utils.unet_to_diffusers(dict(TINY_UNET_CONFIG))
    ushapes = unet_shapes()
    for diffusers_key, ldm_key in diff_map.items():
        if not diffusers_key.endswith(".weight") or ldm_key not in ushapes:
            continue
        shape = ushapes[ldm_key]
        if len(shape) not in (2, 4) or shape[0] == 1:
            continue
        name = "lora_unet_" + diffusers_key[:-len(".weight")].replace(".", "_")
        out[name] = ("diffusion_model." + ldm_key, shape)
    for k, shape in clip_l_shapes().items():
        m = re.match(r"transformer\.text_model\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
                     r"\.weight$", k)
        if m:
            out[f"lora_te_text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"] = (k, shape)
    return out


def random_kohya_lora(seed: int, rank: int = 4, alpha: float = 4.0, scale: float = 0.5,
                      unet: bool = True, text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """A seeded random kohya-format LoRA (lora_down/lora_up/alpha) for the tiny checkpoint.

    Covers every linear/conv weight of the tiny UNet (res blocks, self- and cross-attention, FF, proj)
    and the CLIP-L attention/MLP weights; `scale` sets the delta's size relative to fan-in scaled weights.
    """
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (_, shape) in sorted(_kohya_name_map().items()):
        if name.startswith("lora_unet_") and not unet or name.startswith("lora_te_") and not text_encoder:
            continue
        out_f, in_f = int(shape[0]), int(shape[1])
        if len(shape) == 4:
            kh, kw = int(shape[2]), int(shape[3])
            down = torch.randn(rank, in_f, kh, kw, generator=gen) / (in_f * kh * kw) ** 0.5
            up = torch.randn(out_f, rank, 1, 1, generator=gen) * scale / rank ** 0.5
        else:
            down = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
            up = torch.randn(out_f, rank, generator=gen) * scale / rank ** 0.5
        sd[f"{name}.lora_down.weight"] = down.to(SAVE_DTYPE)
        sd[f"{name}.lora_up.weight"] = up.to(SAVE_DTYPE)
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def write_random_lora(path, seed: int, **kw) -> Path:
    return save_safetensors_atomic(random_kohya_lora(seed, **kw), path, {"ss_network_module": "networks.lora",
                                                                         "diffumatting": "random test LoRA"})


# --- files for a ComfyUI base directory (the server tests, demos) ----------------------------------------
TINY_CHECKPOINT_NAME = "diffumatting_tiny_sd15.safetensors"
TINY_UNET_NAME = "diffumatting_tiny_unet.safetensors"
TINY_LORA_NAMES = ("diffumatting_style_a.safetensors", "diffumatting_style_b.safetensors")


def write_generation_models(base, seed: int = 0) -> dict:
    """Write into a ComfyUI base dir: models/checkpoints/<TINY_CHECKPOINT_NAME>, the tiny checkpoint's
    'fine-tuned' UNet in models/diffumatting/<TINY_UNET_NAME> (ComfyUI `diffusion_model.` layout), and two
    random kohya LoRAs in models/loras. Returns their names."""
    models = Path(base) / "models"
    build_tiny_sd15_checkpoint(models / "checkpoints" / TINY_CHECKPOINT_NAME, seed)
    unet = {"diffusion_model." + k: v for k, v in tiny_unet_finetune(seed + 1, base_seed=seed).items()}
    save_safetensors_atomic(unet, models / "diffumatting" / TINY_UNET_NAME,
                            {"diffumatting": "tiny fine-tuned UNet for tests, random weights"})
    for i, name in enumerate(TINY_LORA_NAMES):
        write_random_lora(models / "loras" / name, seed=seed + 11 + i)
    return {"checkpoint": TINY_CHECKPOINT_NAME, "diffumatting_unet": TINY_UNET_NAME,
            "loras": list(TINY_LORA_NAMES)}
