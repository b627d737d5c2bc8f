"""Files the real-server tests need in the server's base directory (inputs and models), and the mapping of
the public model names the shipped workflows use to the tiny test fixtures.

The shipped workflows name the files an artist has (v1-5-pruned-emaonly.safetensors, sd_xl_base_1.0.safetensors,
...). At test time each public name is a link, in the folder core reads it from, to a tiny fixture of the
same family built with ComfyUI's own classes; `shrink_for_tiny` then lowers a workflow's size and step count
so a test run stays quick. Nothing else in a workflow changes.
"""
from __future__ import annotations

import os
from pathlib import Path

# folder -> {public file name: fixture file name in the same folder}
PUBLIC_NAMES = {
    "checkpoints": {"v1-5-pruned-emaonly.safetensors": "diffumatting_tiny_sd15.safetensors",
                    "sd_xl_base_1.0.safetensors": "diffumatting_tiny_sdxl.safetensors"},
    "diffumatting": {"diffumatting_unet_sd15.safetensors": "diffumatting_tiny_unet.safetensors",
                     "diffumatting_head_sd15.safetensors": "diffumatting_tiny_head.safetensors"},
    "diffusion_models": {"flux1-dev.safetensors": "diffumatting_tiny_flux.safetensors"},
    "text_encoders": {"clip_l.safetensors": "diffumatting_test_clip_l.safetensors",
                      "t5xxl_fp16.safetensors": "diffumatting_test_t5xxl_fp8.safetensors"},
    "vae": {"ae.safetensors": "diffumatting_test_flux_vae.safetensors"},
}
# Fixtures too large to keep in pytest's retained temporary folders (the T5-XXL one is 4.8 GB), by public name.
LARGE_FIXTURES = (("text_encoders", "t5xxl_fp16.safetensors"), ("diffusion_models", "flux1-dev.safetensors"))
FIXTURE_NAMES = {fixture for names in PUBLIC_NAMES.values() for fixture in names.values()}
SDXL_LORA_NAME = "diffumatting_style_sdxl.safetensors"
FLUX_LORA_NAME = "diffumatting_style_flux.safetensors"
TINY_SIZE, TINY_STEPS = 64, 2
_LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")


def populate_server_models(base: Path, sdxl: bool = True, sd15_built: Path | None = None, flux: bool = True) -> dict:
    """Write the test inputs and models into `base` (the SDXL fixture, 2 GB, only with `sdxl`; Flux's four
    files, 6.3 GB, only with `flux`: remove_large_fixtures deletes them; the tiny SD1.5 checkpoint linked from
    `sd15_built` when given, see write_generation_models); returns their names."""
    from support.samples import write_green_sample

    names = {}
    names["green_sample"] = write_green_sample(base / "input" / "diffumatting_green_sample.png").name
    from conftest import add_host_to_path  # the tiny checkpoints are built with ComfyUI's classes

    add_host_to_path()
    from support.tiny_families import build_tiny_sdxl_checkpoint, write_random_sdxl_lora
    from support.tiny_sd15 import write_generation_models

    names["generation"] = write_generation_models(base, built=sd15_built)
    names["workflow_loras"] = {"transparent_sd15": names["generation"]["loras"][0],
                               "transparent_sd15_diffumatting": names["generation"]["loras"][1],
                               "transparent_sdxl": SDXL_LORA_NAME}
    if sdxl:
        build_tiny_sdxl_checkpoint(Path(base) / "models" / "checkpoints" / PUBLIC_NAMES["checkpoints"]
                                   ["sd_xl_base_1.0.safetensors"])
        write_random_sdxl_lora(Path(base) / "models" / "loras" / SDXL_LORA_NAME, seed=31)
        names["sdxl_lora"] = SDXL_LORA_NAME
    if flux:
        _write_flux_files(Path(base) / "models")
        names["workflow_loras"]["transparent_flux"] = FLUX_LORA_NAME
    # Keep after the SD1.5 checkpoint: the head's architecture follows that checkpoint's VAE.
    from matting_fixtures import write_tiny_head

    names["matting_head"] = write_tiny_head(base)
    link_public_names(base)
    return names


def _write_flux_files(models: Path) -> None:
    from support import tiny_flux

    encoders = PUBLIC_NAMES["text_encoders"]
    tiny_flux.build_flux_diffusion_model(models / "diffusion_models" /
                                         PUBLIC_NAMES["diffusion_models"]["flux1-dev.safetensors"])
    tiny_flux.build_clip_l(models / "text_encoders" / encoders["clip_l.safetensors"])
    tiny_flux.build_t5xxl_fp8(models / "text_encoders" / encoders["t5xxl_fp16.safetensors"])
    tiny_flux.build_flux_vae(models / "vae" / PUBLIC_NAMES["vae"]["ae.safetensors"])
    tiny_flux.write_random_flux_lora(models / "loras" / FLUX_LORA_NAME, seed=41)


def remove_large_fixtures(base: Path) -> None:
    """Delete the large fixtures (and their public-name links) once the session's server has stopped."""
    for folder, public in LARGE_FIXTURES:
        link = Path(base) / "models" / folder / public
        link.unlink(missing_ok=True)
        link.with_name(PUBLIC_NAMES[folder][public]).unlink(missing_ok=True)


def link_public_names(base: Path) -> None:
    """Link every public name in PUBLIC_NAMES to its fixture, in the same model folder of `base`."""
    for folder, names in PUBLIC_NAMES.items():
        for public, fixture in names.items():
            target = Path(base) / "models" / folder / fixture
            if not target.is_file():
                continue  # a family left out (populate_server_models(sdxl=False))
            link = target.with_name(public)
            if not link.exists():
                os.symlink(target.name, link)


# Workflows run once, from the page (test_browser.py), through the session's real server, instead of also
# through the API (test_server.py): the Flux fixture's full-size T5-XXL encode costs about a minute of CPU.
RUN_FROM_PAGE_ONLY = frozenset({"transparent_flux"})


def check_writes_rgba_png(files: list, name: str) -> None:
    """A workflow run's output files: at least one RGBA PNG, and the prompt and workflow embedded."""
    from PIL import Image

    from diffumatting.models.png import read_png_text

    assert files, f"{name} wrote no file to the output folder"
    modes = []
    for f in files:
        assert f.is_file(), f
        modes.append(Image.open(f).mode)
    assert "RGBA" in modes, f"{name} wrote no RGBA PNG: {modes}"
    text = read_png_text(files[0].read_bytes())
    assert "prompt" in text and "workflow" in text, f"{name}: prompt and workflow must be embedded"


def shrink_for_tiny(workflow: dict, lora: str | None = None) -> dict:
    """The workflow with its latent size and sampling steps lowered for the tiny fixtures (in place); with
    `lora`, row 1 of each LoRA stack applies that LoRA (a fixture of the workflow's family)."""
    for node in workflow["nodes"]:
        if node["type"] == "DiffuMattingLoraStack" and lora is not None:
            node["widgets_values"][2] = lora
        if node["type"] in _LATENT_NODES:
            node["widgets_values"][0:2] = [TINY_SIZE, TINY_SIZE]
        elif node["type"] == "KSampler":
            node["widgets_values"][1] = "fixed"
            node["widgets_values"][2] = TINY_STEPS
    return workflow
