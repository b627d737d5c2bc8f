"""Model families in the real ComfyUI server: the tiny SDXL fixture is what ComfyUI's detection calls SDXL
(its workflow, with every generation node and a LoRA, runs in test_server.py), and a matting head trained
for another VAE family is refused."""
from __future__ import annotations

import pytest

from comfy_client import WorkflowError

pytestmark = pytest.mark.server
SDXL = "sd_xl_base_1.0.safetensors"


def test_sdxl_fixture_is_detected_as_sdxl(comfy_server):
    from support.tiny_families import detected_model_class

    assert detected_model_class(comfy_server.base / "models" / "checkpoints" / SDXL) == "SDXL"


def _run(server, prompt) -> list:
    answer = server.post("/prompt", {"prompt": prompt})
    entry = server.wait(answer["prompt_id"], timeout=900)
    return server.output_files(entry)


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
