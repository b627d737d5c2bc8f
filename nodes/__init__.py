"""ComfyUI V3 nodes of the pack: thin adapters over models/.

One module per family; each exports NODES, the list of its node classes.
"""
from __future__ import annotations

import os

# Only ComfyExtension is imported from comfy_api here: `io` is the name of this package's io module.
from comfy_api.latest import ComfyExtension

from . import io as io_nodes
from . import refine

MODEL_FOLDER = "diffumatting"


class DiffuMattingExtension(ComfyExtension):
    async def on_load(self) -> None:
        # In-memory registration of models/diffumatting (head files, UNets); nothing is written.
        import folder_paths

        folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))

    async def get_node_list(self) -> list:
        return [*io_nodes.NODES, *refine.NODES]


async def comfy_entrypoint() -> DiffuMattingExtension:
    return DiffuMattingExtension()
