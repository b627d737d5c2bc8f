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


def test_demo_picks_the_workflow_by_detected_family(comfy_server):
    """`make demo MODEL=...`: ComfyUI's detection on the file's shapes picks the family's workflow."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    import demo

    ckpts = comfy_server.base / "models" / "checkpoints"
    assert demo.detect_family(ckpts / "v1-5-pruned-emaonly.safetensors") == ("sd15", "SD15")
    assert demo.detect_family(ckpts / SDXL) == ("sdxl", "SDXL")
    flux = comfy_server.base / "models" / "diffusion_models" / "flux1-dev.safetensors"
    assert demo.detect_family(flux) == ("flux", "Flux")
    with pytest.raises(WorkflowError, match="detected as unknown"):
        demo.detect_family(comfy_server.base / "models" / "diffumatting" / "diffumatting_head_sd15.safetensors")
    assert {w for w, _, _ in demo.FAMILY_WORKFLOWS.values()} <= {p.name for p in (ROOT / "workflows").iterdir()}


def test_sdxl_workflow_with_green_kv_protection(comfy_server, server_models):
    """The SDXL workflow with the LoRA stack in 'green token k/v' mode at full protection (CLIP-L + CLIP-G
    green positions, SDXL's cross-attention layers) runs in the real server and writes its RGBA PNG."""
    import json

    from PIL import Image

    from conftest import ROOT
    from fixtures_host import shrink_for_tiny

    workflow = shrink_for_tiny(json.loads((ROOT / "workflows" / "transparent_sdxl.json").read_text()),
                               server_models["workflow_loras"]["transparent_sdxl"])
    stack = next(n for n in workflow["nodes"] if n["type"] == "DiffuMattingLoraStack")
    assert stack["widgets_values"][-1] == "all cross-attention", "the shipped default"
    stack["widgets_values"][1] = 1.0
    stack["widgets_values"][-1] = "green token k/v"
    files = comfy_server.output_files(comfy_server.run_workflow(workflow, timeout=900))
    assert any(Image.open(f).mode == "RGBA" for f in files), files


def test_flux_lora_stack_refuses_cross_attention_protection(comfy_server, server_models):
    """Flux has no cross-attention layer (joint attention): 'all cross-attention' protection on it is an
    error that says so, not a silent no-op; at green_protection 0 the Flux workflow with a Flux LoRA runs
    (test_server.py)."""
    import json

    from conftest import ROOT
    from fixtures_host import shrink_for_tiny

    workflow = shrink_for_tiny(json.loads((ROOT / "workflows" / "transparent_flux.json").read_text()),
                               server_models["workflow_loras"]["transparent_flux"])
    stack = next(n for n in workflow["nodes"] if n["type"] == "DiffuMattingLoraStack")
    stack["widgets_values"][1] = 0.5
    with pytest.raises(WorkflowError, match=r"green_protection 0\.5 .* MODEL \(Flux\) has no cross-attention layer"):
        comfy_server.run_workflow(workflow, timeout=900)
