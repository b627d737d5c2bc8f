"""The one way code outside ComfyUI imports this pack: as the package `diffumatting`.

ComfyUI imports the pack through its __init__.py (under its custom_nodes folder's name). Everything else,
greenpost.py, train.py, scripts/, tests/ and tests/bench/, calls `register()` once and then imports
`diffumatting.models.*`, `diffumatting.nodes.*` or `diffumatting.training.*`, never `models.*`: so each module
has one name (and one copy) in a process.

`register()` makes this folder the package `diffumatting` without running its __init__.py, which needs
ComfyUI; the plain-torch modules under models/ therefore import without ComfyUI. The scripts at the root
find this file through their own folder, which Python puts on sys.path; the others add the root to sys.path
first (tests/conftest.py appends it, so that ComfyUI's own top-level `nodes` module keeps precedence).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

PACKAGE = "diffumatting"
ROOT = Path(__file__).resolve().parent


def register() -> types.ModuleType:
    """Register the pack's root as the package `diffumatting` (idempotent) and return it."""
    pkg = sys.modules.get(PACKAGE)
    if pkg is not None:
        if [str(Path(p).resolve()) for p in getattr(pkg, "__path__", [])] != [str(ROOT)]:
            raise RuntimeError(f"a different package is already imported as {PACKAGE!r} "
                               f"(from {getattr(pkg, '__path__', '?')}, not {ROOT}); import the pack from one copy")
        return pkg
    pkg = types.ModuleType(PACKAGE, "DiffuMatting for ComfyUI (registered by _package.register)")
    pkg.__path__ = [str(ROOT)]
    pkg.__file__ = str(ROOT / "__init__.py")
    sys.modules[PACKAGE] = pkg
    return pkg
