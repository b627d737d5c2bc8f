"""Every generation node on the other model families, through the real ComfyUI server with tiny fixtures
that ComfyUI's own detection identifies (tests/support/tiny_families.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from comfy_client import WorkflowError
from diffumatting.models.png import read_png_text

pytestmark = pytest.mark.server
SDXL = "sd_xl_base_1.0.safetensors"


def test_sdxl_fixture_is_detected_as_sdxl(comfy_server):
    from support.tiny_families import detected_model_class

    assert detected_model_class(comfy_server.base / "models" / "checkpoints" / SDXL) == "SDXL"


def _generation_prompt(ckpt_loader: dict, lora: str, prefix: str, latent: dict) -> dict:
    """API prompt: loader -> LoRA stack (protected) -> Green Canvas -> GreenPrompt -> KSampler -> matting
    decode without a head (GreenPost) -> transparent PNG. Node "1" is the loader (MODEL 0, CLIP 1, VAE 2)."""
    rows = {"lora_1": lora, "on_1": True, "model_strength_1": 0.8, "clip_strength_1": 0.8, "protect_1": True}
    for i in range(2, 5):
        rows.update({f"lora_{i}": "None", f"on_{i}": True, f"model_strength_{i}": 1.0, f"clip_strength_{i}": 1.0,
                     f"protect_{i}": True})
    return {
        "1": ckpt_loader,
        "2": {"class_type": "DiffuMattingLoraStack",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "model_only": False, "green_protection": 0.5, **rows}},
        "3": {"class_type": "DiffuMattingGreenCanvas",
              "inputs": {"model": ["2", 0], "vae": ["1", 2], "mode": "follow object", "key_color": "#00b140",
                         "strength": 1.0, "end_percent": 1.0, "center_x": 0.5, "center_y": 0.5, "width": 0.6,
                         "height": 0.7, "feather": 0.15}},
        "4": {"class_type": "DiffuMattingGreenPrompt",
              "inputs": {"clip": ["2", 1], "text": "a red apple",
                         "green_phrase": "isolated on a flat green screen background"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
        "6": latent,
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
                         "seed": 0, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}},
        "8": {"class_type": "DiffuMattingVAEDecode",
              "inputs": {"samples": ["7", 0], "vae": ["1", 2], "refine_with_greenpost": True, "tiling": "auto",
                         "tile_size": 512, "tile_overlap": 64}},
        "9": {"class_type": "DiffuMattingSaveRGBA",
              "inputs": {"image": ["8", 2], "filename_prefix": prefix, "bit_depth": "8", "trim": False,
                         "padding": 8, "save_matte": False}},
    }


def _run(server, prompt) -> list:
    answer = server.post("/prompt", {"prompt": prompt})
    entry = server.wait(answer["prompt_id"], timeout=900)
    return server.output_files(entry)


def test_every_generation_node_on_sdxl(comfy_server, server_models):
    prompt = _generation_prompt({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL}},
                                server_models["sdxl_lora"], "tests/sdxl",
                                {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                                               "batch_size": 1}})
    files = _run(comfy_server, prompt)
    assert len(files) == 1
    img = Image.open(files[0])
    assert img.mode == "RGBA" and img.size == (64, 64)
    alpha = np.asarray(img)[..., 3]
    assert alpha.min() >= 0 and alpha.max() <= 255
    assert "DiffuMattingGreenPrompt" in read_png_text(files[0].read_bytes())["prompt"]


def test_head_for_another_vae_family_is_refused(comfy_server, server_models):
    prompt = {"1": {"class_type": "DiffuMattingHeadLoader",
                    "inputs": {"head_name": server_models["matting_head"], "vae_family": "sdxl"}},
              "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL}},
              "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "4": {"class_type": "DiffuMattingVAEDecode",
                    "inputs": {"samples": ["3", 0], "vae": ["2", 2], "head": ["1", 0], "refine_with_greenpost": False,
                               "tiling": "auto", "tile_size": 512, "tile_overlap": 64}},
              "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 2]}}}
    with pytest.raises(WorkflowError, match=r"trained for the SD1\.x/SD2 KL-f8 VAE .* used with the SDXL KL-f8 VAE"):
        _run(comfy_server, prompt)
