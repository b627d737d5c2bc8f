"""The one model-file resolver of the node pack: names from a workflow -> full paths, through ComfyUI's
own folder lookup (folder_paths), with models/model_files.py's rules (safetensors only, no escapes)."""
from __future__ import annotations

from ..models.model_files import WEIGHTS_SUFFIX, check_model_name

MODEL_FOLDER = "diffumatting"


def register_model_folder() -> None:
    """Register models/diffumatting with folder_paths (in memory, nothing written; twice is harmless)."""
    import os

    import folder_paths

    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def _ensure(folder: str) -> None:
    import folder_paths

    if folder == MODEL_FOLDER and MODEL_FOLDER not in folder_paths.folder_names_and_paths:
        register_model_folder()


def model_files(*folders: str) -> list[str]:
    """The .safetensors names in ComfyUI's model folders `folders` (first folder first, no repeats)."""
    import folder_paths

    names: list[str] = []
    for folder in folders:
        _ensure(folder)
        try:
            listed = folder_paths.get_filename_list(folder)
        except KeyError:
            continue
        names += [n for n in listed if n.lower().endswith(WEIGHTS_SUFFIX) and n not in names]
    return names


def resolve_model_file(name, folders: tuple[str, ...], what: str) -> str:
    """Full path of `name` in the first of ComfyUI's model `folders` that has it.

    Refuses (ValueError naming the value and the fix) empty names, pickles, other formats, names that
    leave the folder (absolute, drive letter, `..`, NUL) and names that are not there.
    """
    import folder_paths

    where = " or ".join(f"models/{f}" for f in folders)
    name = check_model_name(name, what, where)
    for folder in folders:
        _ensure(folder)
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    available = model_files(*folders)
    raise ValueError(f"{what} file {name!r} not found in {where}; pick a file from the list (refresh the page "
                     f"after adding files). Available: {available[:20]}")
