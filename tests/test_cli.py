"""The headless CLI `python greenpost.py INPUT_DIR OUTPUT_DIR`, end to end in a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffumatting.models.alpha import parse_hex_color
from diffumatting.models.synthetic import REALISTIC, make_composite

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "greenpost.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd or ROOT)


def _write(path: Path, comp, fmt: str):
    Image.fromarray((comp.image * 255 + 0.5).astype(np.uint8)).save(path, format=fmt)


@pytest.fixture()
def folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    comps = {"a": make_composite(40, 56, 1, REALISTIC), "b": make_composite(33, 21, 2, REALISTIC),
             "c": make_composite(24, 24, 3, REALISTIC)}
    _write(src / "a.png", comps["a"], "PNG")
    _write(src / "b.JPG", comps["b"], "JPEG")
    _write(src / "c.webp", comps["c"], "WEBP")
    (src / "notes.txt").write_text("not an image")
    return src, comps


def test_keys_every_image_to_rgba(folder, tmp_path):
    src, comps = folder
    out = tmp_path / "out" / "nested"
    res = run(src, out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    for stem, comp in comps.items():
        im = Image.open(out / f"{stem}.png")
        assert im.mode == "RGBA" and im.size == (comp.alpha.shape[1], comp.alpha.shape[0])
        alpha = np.asarray(im)[..., 3] / 255.0
        assert np.abs(alpha - comp.alpha).mean() < 0.08
    assert "3/3" in res.stderr and "3 of 3 images keyed" in res.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_unreadable_file_reported_rest_processed(folder, tmp_path):
    src, _ = folder
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    res = run(src, out, "--quiet")
    assert res.returncode == 1
    assert "broken.png" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]


def test_options_and_validation(folder, tmp_path):
    src, _ = folder
    out = tmp_path / "out"
    res = run(src, out, "--key-color", "#2ab54a", "--spill-strength", "0.5", "--edge-detail", "0.2",
              "--quiet")
    assert res.returncode == 0, res.stderr
    again = run(src, out, "--quiet")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert run(src, out, "--quiet", "--overwrite").returncode == 0
    cases = [((src, src), "same folder as INPUT_DIR"),
             ((tmp_path / "missing", out), "does not exist"),
             ((src / "a.png", out), "is a file"),
             ((src, tmp_path / "o2", "--spill-strength", "3"), "outside 0..1"),
             ((src, tmp_path / "o2", "--key-color", "green"), "hex colour"),
             ((src, tmp_path / "o2", "--key-color", "#777777"), "grey"),
             ((src, tmp_path / "o2", "--clip-black", "0.9", "--clip-white", "0.2"), "clip_black"),
             ((tmp_path / "out", tmp_path / "o2"), None)]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[-1] = ((empty, tmp_path / "o2"), "no .png/.jpg/.jpeg/.webp")
    for args, msg in cases:
        res = run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert msg in res.stderr, (args, res.stderr)
    assert not (tmp_path / "o2").exists()


def _cli_alpha_fg(src: Path, out: Path, *flags) -> tuple[np.ndarray, np.ndarray]:
    res = run(src, out, "--quiet", "--overwrite", *flags)
    assert res.returncode == 0, res.stderr
    arr = np.asarray(Image.open(out / "a.png")).astype(np.float32) / 255.0
    return arr[..., 3], arr[..., :3]


def _in_process(src: Path, **options) -> tuple[np.ndarray, np.ndarray]:
    """What the CLI must write for a.png: greenpost() with these options, quantised to 8 bit as the CLI does."""
    import torch

    from diffumatting.models.greenpost import GreenPostOptions, greenpost

    arr = np.asarray(Image.open(src / "a.png").convert("RGB"), np.float32) / 255.0
    fg, alpha = greenpost(torch.from_numpy(arr)[None], None, GreenPostOptions(**options))
    rgba = torch.cat([fg[0], alpha[0, ..., None]], -1).clamp(0, 1).numpy()
    q = (rgba * 255 + 0.5).astype(np.uint8).astype(np.float32) / 255.0
    return q[..., 3], q[..., :3]


@pytest.mark.parametrize("flags,options", [
    (("--key-color", "#1f9a3c"), {"key_color": parse_hex_color("#1f9a3c")}),
    (("--spill-strength", "0"), {"spill_strength": 0.0}),
    (("--edge-detail", "1"), {"edge_detail": 1.0}),
    (("--clip-black", "0.3", "--clip-white", "0.8"), {"clip_black": 0.3, "clip_white": 0.8}),
], ids=["key-color", "spill", "edge-detail", "clip"])
def test_flags_reach_greenpost(folder, tmp_path, flags, options):
    """Each flag changes the keyed PNG, and the PNG is exactly greenpost() run with that option."""
    src, _ = folder
    default_alpha, default_fg = _cli_alpha_fg(src, tmp_path / "default")
    alpha, fg = _cli_alpha_fg(src, tmp_path / "flag", *flags)
    want_alpha, want_fg = _in_process(src, **options)
    assert np.abs(alpha - want_alpha).max() <= 1.5 / 255 and np.abs(fg - want_fg).max() <= 1.5 / 255
    changed = max(np.abs(alpha - default_alpha).max(), np.abs(fg - default_fg).max())
    assert changed > 4 / 255, f"{flags} did not change the output"
    if "--spill-strength" in flags:  # no despill: the edge colours keep more green than the default's
        edge = (default_alpha > 0.05) & (default_alpha < 0.95)
        dominance = lambda c: (c[..., 1] - np.maximum(c[..., 0], c[..., 2]))[edge].mean()  # noqa: E731
        assert dominance(fg) > dominance(default_fg)
    if "--clip-black" in flags:  # levels: more fully clear and fully opaque pixels
        assert (alpha == 0).mean() >= (default_alpha == 0).mean() and (alpha == 1).mean() > (default_alpha == 1).mean()


def test_help_documents_every_flag():
    res = run("--help")
    assert res.returncode == 0
    for flag in ("--key-color", "--spill-strength", "--edge-detail", "--clip-black", "--clip-white",
                 "--overwrite", "--threads", "--quiet"):
        assert flag in res.stdout
