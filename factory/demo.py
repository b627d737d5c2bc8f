"""`make dataset-demo`: a ComfyUI base folder with the tiny test models, built now with ComfyUI's own classes
(seeded random weights; nothing is downloaded). Needs the dev host (`make setup`)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_base(base: Path) -> Path:
    """Lay out `base` as a ComfyUI base folder holding the test suite's tiny checkpoint, UNet, LoRAs, head."""
    from comfy_client import prepare_base_dir

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_host import populate_server_models  # the same files the server tests use

    prepare_base_dir(base)
    populate_server_models(base, sdxl=False)
    return base


def tiny_workflow(workflow: dict) -> dict:
    """A shipped SD1.5 workflow at the tiny model's size and step count (its public file names are links to
    the tiny models in tiny_base)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_host import shrink_for_tiny

    return shrink_for_tiny(workflow)
