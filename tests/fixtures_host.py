"""Files the real-server tests need in the server's base directory (inputs and models)."""
from __future__ import annotations

from pathlib import Path


def populate_server_models(base: Path) -> dict:
    """Write the test inputs and models into `base`; returns their names."""
    from diffumatting.models.samples import write_green_sample

    names = {}
    names["green_sample"] = write_green_sample(base / "input" / "diffumatting_green_sample.png").name
    return names
