"""Shared fixtures.

- The pack is importable as the package `diffumatting` (_package.register(): its root registered without
  running the root __init__, so pure tests of models/ never import ComfyUI).
- `comfy_host` puts the real ComfyUI from .host/ on sys.path for in-process tests of nodes.
- `comfy_server` starts the real ComfyUI server once per session, with its own base directory.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / ".host" / "ComfyUI"
SHARED_DATA = ROOT.parent / "shared" / "data"
ARTIFACTS = ROOT / "artifacts"

# Appended (not inserted): the root is on sys.path only to find _package.py; ComfyUI's own top-level
# modules (`nodes`, `comfy`), inserted in front by add_host_to_path, keep precedence.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import _package  # noqa: E402

_package.register()

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def add_host_to_path() -> None:
    """Make the real ComfyUI importable in this process (CPU, default arguments)."""
    if not (HOST / "main.py").is_file():
        raise RuntimeError(f"ComfyUI host missing at {HOST}: run `make setup`")
    if str(HOST) not in sys.path:
        sys.path.insert(1, str(HOST))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()


@pytest.fixture(scope="session")
def comfy_host():
    add_host_to_path()
    import folder_paths  # noqa: F401

    return HOST


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def server_base(tmp_path_factory) -> Path:
    """Base directory of the session's ComfyUI server. Fixtures add models before the server starts."""
    from comfy_client import prepare_base_dir

    return prepare_base_dir(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def comfy_server(server_base, server_models):
    from comfy_client import ComfyServer

    server = ComfyServer(server_base)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_sd15_path(comfy_host, tmp_path_factory) -> Path:
    """The session's tiny SD1.5-shaped checkpoint (seed 0), built once."""
    from support.tiny_sd15 import cached_tiny_sd15_checkpoint

    return cached_tiny_sd15_checkpoint(tmp_path_factory.getbasetemp() / "tiny_models")


@pytest.fixture(scope="session")
def server_models(server_base, tiny_sd15_path) -> dict:
    """Files placed in the server's model folders before it starts (extended by later issues)."""
    from fixtures_host import populate_server_models, remove_large_fixtures

    yield populate_server_models(server_base, sd15_built=tiny_sd15_path)
    remove_large_fixtures(server_base)  # after the servers using them have stopped

