"""Helpers for the matting-head tests and the server fixtures: small ComfyUI VAEs and the tiny head file."""
from __future__ import annotations

from pathlib import Path

import torch

TINY_HEAD_NAME = "diffumatting_tiny_head.safetensors"
TINY_CHECKPOINT_NAME = "diffumatting_tiny_sd15.safetensors"


def kl_ddconfig(ch: int = 32, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 1) -> dict:
    """ddconfig of ComfyUI's KL-f8 AutoencoderKL (SD1.x/SDXL use ch=128, ch_mult=(1,2,4,4), 2 blocks)."""
    return {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
            "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks, "attn_resolutions": [], "dropout": 0.0}


def random_vae_state_dict(ddconfig: dict, seed: int = 0) -> dict:
    """Seeded random weights for ComfyUI's AutoencoderKL (fan-in scaled convs, unit norms, zero biases)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=ddconfig["z_channels"])
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if "norm" in k.split(".")[-2] and k.endswith("weight"):
            sd[k] = torch.ones_like(v)
        elif k.endswith("bias"):
            sd[k] = torch.zeros_like(v)
        else:
            fan_in = v[0].numel() if v.ndim > 1 else 1
            sd[k] = torch.randn(v.shape, generator=gen) / fan_in ** 0.5
    return sd


def small_vae(seed: int = 0, dtype=torch.float32, **ddkw):
    """A comfy.sd.VAE of the real SD1.x KL-f8 classes, small channel counts, seeded random weights."""
    import comfy.sd

    dd = kl_ddconfig(**ddkw)
    return comfy.sd.VAE(sd=random_vae_state_dict(dd, seed), config={"params": {"ddconfig": dd, "embed_dim": 4}},
                        dtype=dtype)


def decoder_device(vae) -> torch.device:
    """Where the VAE's decoder weights are now: the CPU in CI; on a GPU machine, the GPU once core has loaded
    them (for tests that run the decoder directly, outside core's loading)."""
    return next(vae.first_stage_model.decoder.parameters()).device


def write_tiny_head(base: Path, seed: int = 0) -> str:
    """Write models/diffumatting/<TINY_HEAD_NAME> into a server base dir: a seeded head whose architecture
    fits the VAE of the tiny checkpoint when it is already in models/checkpoints (else SD1.x's)."""
    from diffumatting.models.matting_head import HeadConfig, MattingHead, save_head

    ckpt = Path(base) / "models" / "checkpoints" / TINY_CHECKPOINT_NAME
    config = HeadConfig()
    if ckpt.is_file():
        from safetensors import safe_open

        with safe_open(str(ckpt), "pt") as f:
            keys = [k for k in f.keys() if k.startswith("first_stage_model.decoder.")]
            shapes = {k: _Shape(f.get_slice(k).get_shape()) for k in keys}
        config = HeadConfig.for_vae_state_dict(shapes, prefix="first_stage_model.decoder.")
    head = MattingHead(config).reset_parameters(seed)
    path = Path(base) / "models" / "diffumatting" / TINY_HEAD_NAME
    save_head(path, head, "sd1", {"note": "seeded random weights for tests"})
    return path.name


class _Shape:
    """Stands in for a tensor where only `.shape` is read."""

    def __init__(self, shape):
        self.shape = tuple(shape)
