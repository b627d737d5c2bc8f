"""ComfyUI V3 nodes of the pack: thin adapters over models/.

One module per family; each exports NODES, the list of its node classes.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension

from . import batch_export, export, generate, lora, matting, refine
from ._files import MODEL_FOLDER, register_model_folder  # noqa: F401  (comfy_entrypoint, older imports)


class DiffuMattingExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return [*export.NODES, *batch_export.NODES, *refine.NODES, *matting.NODES, *generate.NODES, *lora.NODES]


async def comfy_entrypoint() -> DiffuMattingExtension:
    register_model_folder()
    return DiffuMattingExtension()
