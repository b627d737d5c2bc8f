"""Test fixtures on top of the trainer's tiny SD1.5-shaped checkpoint (training/tiny_checkpoint.py).

A cached checkpoint per test session, a seeded "fine-tuned" UNet, random kohya LoRAs (UNet and CLIP-L) and
the model files the real-server tests place in a ComfyUI base directory. Needs ComfyUI importable.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from diffumatting.training.tiny_checkpoint import (SAVE_DTYPE, TINY_UNET_CONFIG, build_tiny_sd15_checkpoint,
                                                   clip_l_shapes, random_state_dict, save_safetensors_atomic,
                                                   unet_shapes)


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
                      unet: bool = True, text_encoder: bool = True,
                      name_map: dict[str, tuple[str, torch.Size]] | None = None) -> dict[str, torch.Tensor]:
    """A seeded random kohya-format LoRA (lora_down/lora_up/alpha) for the tiny checkpoint.

    Covers every linear/conv weight of the tiny UNet (res blocks, self- and cross-attention, FF, proj)
    and the CLIP-L attention/MLP weights; `scale` sets the delta's size relative to fan-in scaled weights.
    `name_map` (kohya module name -> (weight key, shape)) targets another model (tests/support/tiny_families).
    """
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (_, shape) in sorted((name_map if name_map is not None else _kohya_name_map()).items()):
        if name.startswith("lora_unet_") and not unet or name.startswith("lora_te") and not text_encoder:
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


def write_generation_models(base, seed: int = 0, built: Path | None = None) -> dict:
    """Write into a ComfyUI base dir: models/checkpoints/<TINY_CHECKPOINT_NAME>, the tiny checkpoint's
    'fine-tuned' UNet in models/diffumatting/<TINY_UNET_NAME> (ComfyUI `diffusion_model.` layout), and two
    random kohya LoRAs in models/loras. Returns their names.

    `built`: the tiny checkpoint of this seed already built on the same file system (a test session's
    `cached_tiny_sd15_checkpoint`), hard-linked instead of built again."""
    models = Path(base) / "models"
    target = models / "checkpoints" / TINY_CHECKPOINT_NAME
    if built is None:
        build_tiny_sd15_checkpoint(target, seed)
    else:
        if Path(built).name != f"tiny_sd15_seed{seed}.safetensors":
            raise ValueError(f"built checkpoint {built} is not the seed-{seed} tiny checkpoint")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(built, target)
    unet = {"diffusion_model." + k: v for k, v in tiny_unet_finetune(seed + 1, base_seed=seed).items()}
    save_safetensors_atomic(unet, models / "diffumatting" / TINY_UNET_NAME,
                            {"diffumatting": "tiny fine-tuned UNet for tests, random weights"})
    for i, name in enumerate(TINY_LORA_NAMES):
        write_random_lora(models / "loras" / name, seed=seed + 11 + i)
    return {"checkpoint": TINY_CHECKPOINT_NAME, "diffumatting_unet": TINY_UNET_NAME,
            "loras": list(TINY_LORA_NAMES)}
