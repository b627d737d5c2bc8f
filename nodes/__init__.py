"""ComfyUI V3 nodes of the pack: thin adapters over models/.

One module per family; each exports NODES, the list of its node classes.
"""
from __future__ import annotations

import os

from comfy_api.latest import ComfyExtension

from . import export, generate, lora, matting, refine

MODEL_FOLDER = "diffumatting"


def register_model_folder() -> None:
    """Register models/diffumatting (head files, UNets) with folder_paths: in memory, nothing written.

    Called from comfy_entrypoint, which every ComfyUI with V3 calls (ComfyExtension.on_load is not
    called by older hosts such as 0.3.75). Registering twice is harmless.
    """
    import folder_paths

    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


class DiffuMattingExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return [*export.NODES, *refine.NODES, *matting.NODES, *generate.NODES, *lora.NODES]


async def comfy_entrypoint() -> DiffuMattingExtension:
    register_model_folder()
    return DiffuMattingExtension()
