"""The export nodes (nodes/export.py) writing into a test's own output folder."""
from __future__ import annotations


def export_nodes_in(tmp_path, monkeypatch):
    """(the nodes.export module, the output folder): ComfyUI's output directory is `tmp_path/output` for the
    calling test only (monkeypatch undoes it). Needs the ComfyUI host on sys.path (the comfy_host fixture)."""
    import folder_paths

    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out))
    from diffumatting.nodes import export

    return export, out
