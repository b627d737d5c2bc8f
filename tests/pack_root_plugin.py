"""pytest plugin: collect the pack's root folder as a plain directory, not a Python package.

The root has an __init__.py because ComfyUI imports the pack through it, and that file needs the
ComfyUI host. Without this plugin pytest would import it while setting up any test; with it, pure
tests of models/ never import ComfyUI and the host tests import it explicitly.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collect_directory(path, parent):
    if Path(path) == ROOT:
        return pytest.Dir.from_parent(parent, path=Path(path))
    return None
