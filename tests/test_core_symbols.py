"""The ComfyUI symbols the pack uses (nodes/_core_symbols.py): each resolves on the host, and the list is
complete (every core name the pack's code reaches through an import is on it)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE_ROOTS = ("comfy", "comfy_api", "folder_paths")


@pytest.fixture(scope="module")
def symbols(comfy_host):
    from diffumatting.nodes import _core_symbols

    return _core_symbols


def test_every_listed_symbol_resolves_on_the_host(symbols):
    assert symbols.missing_symbols() == []


def test_vae_object_attributes(symbols):
    from matting_fixtures import small_vae

    assert symbols.missing_vae_attributes(small_vae(seed=0)) == []


def test_a_renamed_symbol_is_reported(symbols, monkeypatch):
    """The check can fail: a symbol core no longer has is named in the result."""
    monkeypatch.setitem(symbols.CORE_SYMBOLS, "comfy.utils", ("ProgressBar", "tiled_scale_renamed"))
    assert symbols.missing_symbols() == ["comfy.utils:tiled_scale_renamed"]


def _core_uses(path: Path) -> set[str]:
    """Dotted core names a file reaches: `mm.dtype_size` after `import comfy.model_management as mm`,
    `comfy.utils.ProgressBar` after `import comfy.utils`, `io.Combo.Input` after `from comfy_api.latest import io`."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}
    uses: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in CORE_ROOTS:
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.split(".")[0]] = a.name.split(".")[0]
                    uses.add(a.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in CORE_ROOTS:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    uses.add(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                parts = [p for p in reversed(chain) if not p.startswith("__")]
                uses.add(".".join([aliases[cur.id], *parts]))
    return uses


def test_every_core_name_the_pack_uses_is_listed(symbols):
    files = sorted([*ROOT.joinpath("nodes").glob("*.py"), *ROOT.joinpath("training").glob("*.py"),
                    ROOT / "__init__.py"])
    uses = {use: f.relative_to(ROOT).as_posix() for f in files for use in _core_uses(f)}
    assert "comfy.model_management.dtype_size" in uses and "comfy_api.latest.io.Schema" in uses  # the scan works
    unlisted = sorted(f"{use} ({where})" for use, where in uses.items() if not symbols.listed(use))
    assert unlisted == [], "add these to nodes/_core_symbols.py (after checking them in the newest ComfyUI)"
