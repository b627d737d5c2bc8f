"""Import ComfyUI's model code without its server (the trainer loads checkpoints with ComfyUI's loaders).

The ComfyUI root is, in order: the `comfyui` argument / config value, $COMFYUI_PATH, the ComfyUI this
pack is installed in (custom_nodes/<pack>/../..), the dev host at <pack>/.host/ComfyUI.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def candidate_roots(explicit: str | None = None) -> list[Path]:
    roots = []
    if explicit:
        roots.append(Path(explicit).expanduser())
    if os.environ.get("COMFYUI_PATH"):
        roots.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if PACK_ROOT.parent.name == "custom_nodes":
        roots.append(PACK_ROOT.parent.parent)
    roots.append(PACK_ROOT / ".host" / "ComfyUI")
    return roots


def find_comfyui(explicit: str | None = None) -> Path:
    roots = candidate_roots(explicit)
    for root in roots:
        if (root / "comfy" / "sd.py").is_file():
            return root.resolve()
    if explicit:
        raise ValueError(f"--comfyui {explicit!r} is not a ComfyUI folder (no comfy/sd.py there); pass the folder "
                         f"that holds ComfyUI's main.py")
    raise ValueError("ComfyUI not found: pass --comfyui /path/to/ComfyUI (the folder with main.py) or set "
                     "COMFYUI_PATH; looked in " + ", ".join(str(r) for r in roots))


def import_comfy(explicit: str | None = None, cpu: bool | None = None):
    """Put ComfyUI on sys.path with headless arguments and return the `comfy.sd` module.

    In a fresh process the trainer asks for PyTorch's SDPA attention (differentiable and the same kernel
    the green capture uses). If ComfyUI is already imported (tests, in-process), it is left as it is.
    """
    import torch

    root = find_comfyui(explicit)
    if str(root) not in sys.path:
        sys.path.insert(1, str(root))
    already = "comfy.model_management" in sys.modules
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    if not already:
        args.cpu = (not torch.cuda.is_available()) if cpu is None else bool(cpu)
        args.use_pytorch_cross_attention = True
        args.disable_smart_memory = True
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401

    return comfy.sd
