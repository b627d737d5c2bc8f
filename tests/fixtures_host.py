"""Files the real-server tests need in the server's base directory (inputs and models)."""
from __future__ import annotations

from pathlib import Path


def populate_server_models(base: Path) -> dict:
    """Write the test inputs and models into `base`; returns their names."""
    from support.samples import write_green_sample

    names = {}
    names["green_sample"] = write_green_sample(base / "input" / "diffumatting_green_sample.png").name
    from conftest import add_host_to_path  # the tiny checkpoint is built with ComfyUI's classes

    add_host_to_path()
    from support.tiny_sd15 import write_generation_models

    names["generation"] = write_generation_models(base)
    # Keep last: the head's architecture follows the tiny checkpoint's VAE when that is already written.
    from matting_fixtures import write_tiny_head

    names["matting_head"] = write_tiny_head(base)
    return names
