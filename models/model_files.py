"""Names of model files (weights) that users and workflows pick: one set of rules for the whole pack.

Weights load from .safetensors only: pickle formats can run code when they are loaded and are refused.
A name is relative to its model folder; absolute paths, drive letters, `..` parts and NUL bytes are
refused before any file system call, so a name from a workflow never reaches outside the folder.
Plain Python (no torch, no ComfyUI); nodes/_files.py adds ComfyUI's folder lookup.
"""
from __future__ import annotations

import os

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
WEIGHTS_SUFFIX = ".safetensors"


def check_model_name(name, what: str, folder: str) -> str:
    """`name` stripped, or a ValueError naming it, what was expected and the fix.

    what: the kind of file ("LoRA", "UNet", "matting head"); folder: where it lives ("models/loras").
    """
    name = "" if name is None else str(name).strip()
    if not name or name == "None":
        raise ValueError(f"no {what} file chosen; put a {WEIGHTS_SUFFIX} file in {folder} and pick it")
    if "\0" in name:
        raise ValueError(f"{what} name {name!r} contains a NUL byte; pick a file from the list")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{what} {name!r} is a pickle file, which can run code when loaded and is refused; "
                         f"{what} files load from {WEIGHTS_SUFFIX} only (convert it to {WEIGHTS_SUFFIX} first)")
    if not name.lower().endswith(WEIGHTS_SUFFIX):
        raise ValueError(f"{what} {name!r} is not a {WEIGHTS_SUFFIX} file; {what} files load from "
                         f"{WEIGHTS_SUFFIX} only")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\", "~")) or ".." in parts or ":" in parts[0]:
        raise ValueError(f"{what} name {name!r} points outside {folder}; pick a file from the list")
    return name
