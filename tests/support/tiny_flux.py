"""Flux.1 [dev] test fixtures built with ComfyUI's own classes: the four files `transparent_flux.json` loads.

- diffusion model (`flux1-dev.safetensors`, UNETLoader): core's `Flux` with what its detection fixes
  (hidden size 3072, 24 heads, axes [16, 56, 56], T5 context 4096, CLIP-L vector 768, guidance embedding) and
  the fewest blocks it allows, one double and one single: about 0.55 billion parameters, stored in float16.
- CLIP-L (`clip_l.safetensors`): the full CLIP-L text model in the public file's `text_model.*` layout.
- T5-XXL (`t5xxl_fp16.safetensors`): core builds Flux's T5 from its fixed XXL config (4.76 billion parameters)
  and reads only the dtype from the file, so the fixture is full size. It is stored as float8 e4m3fn, the
  layout of the public `t5xxl_fp8_e4m3fn.safetensors` (4.8 GB instead of 9.5), and written as a stream from
  a seeded 64 MiB pool of random bytes masked to small values (|w| <= 0.03), each tensor from its own
  offset: seconds, where drawing 4.76 billion normal numbers takes minutes on the test machine.
- VAE (`ae.safetensors`): core's 16-channel KL autoencoder without quant convs (detected as Flux's).

Weights are seeded random numbers; the files only need to load and run through core's real code paths.
Needs ComfyUI importable (the tests' `comfy_host` fixture).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from diffumatting.models.atomic import atomic_path
from diffumatting.training.tiny_checkpoint import (SD_VAE_DDCONFIG, _meta_shapes, clip_l_shapes,
                                                   random_state_dict, save_safetensors_atomic)

FLUX_DEV_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
POOL_BYTES = 64 << 20
FP8_SMALL_MASK = 0x8F  # keep sign and mantissa, exponent field 0 or 1: |value| <= 1.875 * 2**-6
FP8_ONE = 0x38  # 1.0 in float8 e4m3fn (exponent field 7 = bias, mantissa 0)


def flux_shapes() -> dict[str, torch.Size]:
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    with torch.device("meta"):
        model = Flux(**FLUX_DEV_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)
    return _meta_shapes(model)


def t5xxl_shapes() -> dict[str, torch.Size]:
    """ComfyUI's T5-XXL encoder (its fixed t5_config_xxl.json), keys as in the public t5xxl files."""
    import comfy.ops
    from comfy.text_encoders import t5

    config = json.loads((Path(t5.__file__).parent / "t5_config_xxl.json").read_text())
    with torch.device("meta"):
        model = t5.T5(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return _meta_shapes(model)


def write_fp8_stream(shapes: dict[str, torch.Size], path, seed: int, metadata: dict[str, str]) -> Path:
    """A float8 e4m3fn safetensors file for `shapes`, written tensor by tensor (never all in memory): norm
    weights 1, every other tensor a slice of a seeded pool of small random float8 values."""
    pool = np.frombuffer(np.random.default_rng(seed).bytes(POOL_BYTES), dtype=np.uint8) & FP8_SMALL_MASK
    names = sorted(shapes)
    header, offset = {"__metadata__": dict(metadata)}, 0
    for name in names:
        n = int(torch.Size(shapes[name]).numel())
        header[name] = {"dtype": "F8_E4M3", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for i, name in enumerate(names):
            n = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if name.endswith("norm.weight"):
                f.write(bytes([FP8_ONE]) * n)
                continue
            start = (i * 2_654_435_761) % POOL_BYTES
            while n:
                chunk = pool[start:start + n]
                f.write(memoryview(chunk))
                n -= len(chunk)
                start = 0
    return path


def build_flux_diffusion_model(path, seed: int = 0) -> Path:
    return save_safetensors_atomic(random_state_dict(flux_shapes(), seed), path,
                                   {"diffumatting": "Flux.1-dev-detected test model (1 double + 1 single block), "
                                                    "random weights", "seed": str(seed)})


def build_clip_l(path, seed: int = 1) -> Path:
    sd = {k[len("transformer."):]: v for k, v in random_state_dict(clip_l_shapes(), seed).items()}
    return save_safetensors_atomic(sd, path, {"diffumatting": "CLIP-L test text encoder, random weights"})


def build_t5xxl_fp8(path, seed: int = 2) -> Path:
    return write_fp8_stream(t5xxl_shapes(), path, seed,
                            {"diffumatting": "T5-XXL test text encoder (float8 e4m3fn), random weights",
                             "seed": str(seed)})


def build_flux_vae(path, seed: int = 3) -> Path:
    from matting_fixtures import random_vae_state_dict

    sd = random_vae_state_dict({**SD_VAE_DDCONFIG, "z_channels": 16}, seed=seed)
    sd = {k: v.half() for k, v in sd.items() if "quant_conv" not in k}
    return save_safetensors_atomic(sd, path, {"diffumatting": "Flux-detected 16-channel test VAE, random weights"})


def flux_kohya_name_map() -> dict[str, tuple[str, torch.Size]]:
    """kohya module names of a Flux LoRA (sd-scripts' `lora_unet_double_blocks_0_img_attn_qkv` layout): the
    attention and MLP linears of every double and single block."""
    out = {}
    for key, shape in flux_shapes().items():
        if key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and len(shape) == 2 \
                and ".norm." not in key and "_mod." not in key and ".modulation." not in key:
            out["lora_unet_" + key[:-len(".weight")].replace(".", "_")] = ("diffusion_model." + key, shape)
    return out


def write_random_flux_lora(path, seed: int, **kw) -> Path:
    from support.tiny_sd15 import random_kohya_lora

    return save_safetensors_atomic(random_kohya_lora(seed, name_map=flux_kohya_name_map(), **kw), path,
                                   {"ss_network_module": "networks.lora_flux", "diffumatting": "random Flux test LoRA"})
