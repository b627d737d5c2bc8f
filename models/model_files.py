"""Names of model files (weights) that users and workflows pick: one set of rules for the whole pack.

Weights load from .safetensors only: pickle formats can run code when they are loaded and are refused.
A name is relative to its model folder; absolute paths, drive letters, `..` parts and NUL bytes are
refused before any file system call, so a name from a workflow never reaches outside the folder.
Plain Python (no torch, no ComfyUI); nodes/_files.py adds ComfyUI's folder lookup.
Self-describing weights files keep their architecture in the safetensors metadata: `read_self_describing`
checks the kind and format version, `config_from_json` rebuilds the architecture's config dataclass.
"""
from __future__ import annotations

import dataclasses
import json
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


def read_safetensors_header(path, save_hint: str) -> dict:
    """Header of a safetensors file (tensor table and `__metadata__`), read without loading any tensor, with
    clear errors for pickles, truncation and other formats. save_hint: how to write the file properly
    (e.g. "save the head with save_head (safetensors)")."""
    import json
    import struct
    from pathlib import Path

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        start = fh.read(9)
        if start[:4] == b"PK\x03\x04" or (len(start) == 9 and start[:1] == b"\x80" and start[8:9] != b"{"):
            raise ValueError(f"{path.name} is a pickle (PyTorch .ckpt/.pt) file, which can run code when loaded "
                             f"and is refused; {save_hint}")
        if len(start) < 9:
            raise ValueError(f"{path.name} is truncated or empty ({size} bytes): not a complete safetensors "
                             f"file; copy or save it again")
        (n,) = struct.unpack("<Q", start[:8])
        fh.seek(8)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path.name} is truncated or not a safetensors file (header claims {n} bytes, the "
                             f"file has {size}); copy or save it again")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path.name} is not a safetensors file (unreadable header: {e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file (header is not an object)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{path.name} is not a safetensors file (malformed tensor table: {e})") from e
    if 8 + n + end > size:
        raise ValueError(f"{path.name} is truncated: its tensors need {8 + n + end} bytes, the file has {size}; "
                         f"copy or save it again")
    return header


def read_self_describing(path, *, kind: str, format_version: int, what: str, wrong_kind_hint: str,
                         save_hint: str, missing_hint: str = "") -> tuple[dict, dict, int]:
    """Open a self-describing weights file of the pack: a .safetensors whose metadata names its `kind` and
    `format_version` (and whatever else the kind needs). Refuses pickles (by name and by content), missing
    files, other formats, other kinds and versions newer than `format_version`, each with a message that
    names the file, what was expected and the fix.

    what: the kind in words ("matting head"); wrong_kind_hint: what to do with a file of another kind;
    save_hint: how such a file is written; missing_hint: added to the missing-file message. Returns (header, metadata, version); no tensor is read."""
    import os
    from pathlib import Path

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path.name}: pickle files ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded and "
                         f"are refused; {what} files load from {WEIGHTS_SUFFIX} only")
    if not path.is_file():
        raise ValueError(f"{what} file {os.fspath(path)!r} does not exist" + (f"; {missing_hint}" if missing_hint else ""))
    header = read_safetensors_header(path, save_hint)
    meta = header.get("__metadata__") or {}
    if meta.get("kind") != kind:
        raise ValueError(f"{path.name} is not a {what} (its metadata kind is {meta.get('kind')!r}, expected "
                         f"{kind!r}); {wrong_kind_hint}")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{path.name}: format_version {meta.get('format_version')!r} is not a number; the file "
                         f"is damaged or was not written by this pack") from None
    if version > format_version:
        raise ValueError(f"{path.name} has {what} format version {version}; this pack reads up to "
                         f"{format_version}: update comfyui-diffumatting")
    return header, dict(meta), version


def config_from_json(config_class, text, what: str):
    """An instance of the dataclass `config_class` from `text`, the JSON object a weights file keeps in its
    metadata (e.g. `config`). JSON lists become tuples (configs are frozen dataclasses; JSON has no tuples).
    Text that is not a JSON object, fields the class does not have (a newer pack wrote the file) and missing
    fields are a ValueError naming `what` ("matting head"); the class's own checks raise theirs.
    """
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} config is not valid JSON ({e}): {str(text)[:200]!r}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} config must be a JSON object, got {type(data).__name__}: {str(text)[:200]!r}")
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{what} config has unknown fields {unknown}; it was written by a newer version of the "
                         f"pack: update comfyui-diffumatting")
    missing = sorted(name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{what} config lacks the fields {missing}; the file is damaged or was not written by "
                         f"this pack")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
