"""A real-size SD1.5 checkpoint with seeded random weights, built with ComfyUI's own classes.

The UNet has SD1.5's full architecture (model_channels 320, channel_mult 1-2-4-4, two res blocks per
level, transformers at the first three levels, 860M parameters); CLIP-L and the KL-f8 VAE as in the tiny
checkpoint (training/tiny_checkpoint.py, whose random-weight rules this reuses). ComfyUI's model
detection reads the file as SD1.5. For the training-overhead benchmark and the GPU smoke run: code paths
and tensor sizes of a real fine-tune, without real weights (none exist on these machines).

    python tests/support/sd15_full.py OUT.safetensors [--seed N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SD15_UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_linear_in_transformer": False, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "use_temporal_resblock": False, "use_temporal_attention": False,
}


def sd15_unet_shapes() -> dict[str, torch.Size]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**dict(SD15_UNET_CONFIG), device="meta", operations=comfy.ops.disable_weight_init)
    return {k: v.shape for k, v in unet.state_dict().items()}


def build_sd15_checkpoint(path, seed: int = 0) -> Path:
    """Write a full-size SD1.5 checkpoint with random weights (float16) to `path`."""
    from diffumatting.training.tiny_checkpoint import (clip_l_shapes, random_state_dict, save_safetensors_atomic,
                                                       vae_shapes)

    sd = {}
    sd.update(random_state_dict(sd15_unet_shapes(), seed, "model.diffusion_model."))
    sd.update(random_state_dict(clip_l_shapes(), seed + 1, "cond_stage_model."))
    sd.update(random_state_dict(vae_shapes(), seed + 2, "first_stage_model."))
    return save_safetensors_atomic(sd, path, {"diffumatting": "SD1.5-architecture checkpoint, random weights",
                                               "seed": str(seed)})


def cached_sd15_checkpoint(folder, seed: int = 0) -> Path:
    path = Path(folder) / f"sd15_random_seed{seed}.safetensors"
    if not path.is_file():
        build_sd15_checkpoint(path, seed)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="checkpoint file to write (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: auto-detect, as train.py does)")
    a = p.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    import _package

    _package.register()
    from diffumatting.training.host import import_comfy

    import_comfy(a.comfyui, cpu=not torch.cuda.is_available())
    path = build_sd15_checkpoint(a.out, a.seed)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
