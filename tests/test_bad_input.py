"""Bad input to the pure parts (models/, the greenpost.py CLI): each case gets a clear error, nothing runs
away, nothing is lost (issue 13). Node and server cases are in test_bad_input_nodes.py / _server.py."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffumatting.models import atomic
from diffumatting.models.atomic import atomic_path, clean_stale_temporaries, write_all_atomic, write_bytes_atomic

ROOT = Path(__file__).resolve().parents[1]


class CliResult:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def _cli(*args) -> CliResult:
    """Run greenpost.py's main() in this process (a subprocess costs seconds of imports per call)."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("greenpost_cli", ROOT / "greenpost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = module.main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            rc = e.code
    return CliResult(rc, err.getvalue())


def _green_png(path: Path, h=24, w=32):
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = (20, 180, 60)
    img[h // 3:2 * h // 3, w // 3:2 * w // 3] = (200, 60, 40)
    Image.fromarray(img).save(path)
    return path


def _one_image_folder(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    _green_png(src / "a.png")
    return src


# --- files keep the umask (defect 7) ------------------------------------------------------------------
@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_honour_the_umask(tmp_path, umask_022):
    write_bytes_atomic(tmp_path / "a.bin", b"1")
    write_all_atomic([(tmp_path / "b.png", b"2")])
    with atomic_path(tmp_path / "c.safetensors") as tmp:
        tmp.write_bytes(b"3")
    assert [_mode(tmp_path / n) for n in ("a.bin", "b.png", "c.safetensors")] == [0o644] * 3


def test_replacing_a_file_keeps_its_mode(tmp_path, umask_022):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    write_all_atomic([(target, b"new")])
    assert target.read_bytes() == b"new" and _mode(target) == 0o640


def test_cli_output_is_readable_by_others(tmp_path, umask_022):
    src = _one_image_folder(tmp_path)
    out = tmp_path / "out"
    res = _cli(src, out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert _mode(out / "a.png") == 0o644
    os.chmod(out / "a.png", 0o644)
    res = _cli(src, out, "--quiet", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert _mode(out / "a.png") == 0o644


# --- stale temporaries (weak spot: SIGKILL leaves a hidden 0-byte PNG) ------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    stale = tmp_path / atomic.temp_name("a.png", _dead_pid(), ".png")
    stale.write_bytes(b"")
    live = tmp_path / atomic.temp_name("b.png", os.getpid(), ".png")
    live.write_bytes(b"")
    foreign = tmp_path / ".a.png.user-file.png"
    foreign.write_bytes(b"keep")
    assert clean_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()
    # The next write into the folder cleans up by itself.
    stale.write_bytes(b"")
    write_bytes_atomic(tmp_path / "c.bin", b"1")
    assert not stale.exists()


def test_sigkill_leftover_is_cleaned_by_the_next_cli_run(tmp_path):
    src = _one_image_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / atomic.temp_name("a.png", _dead_pid(), ".png")
    leftover.write_bytes(b"")
    res = _cli(src, out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]


# --- CLI: one clear line, no traceback ------------------------------------------------------------------
def test_cli_uncreatable_output_folder_is_one_line(tmp_path):
    src = _one_image_folder(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli(src, blocker / "sub", "--quiet")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "cannot create OUTPUT_DIR" in res.stderr and str(blocker / "sub") in res.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_unwritable_output_folder_is_one_line(tmp_path):
    src = _one_image_folder(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        res = _cli(src, out, "--quiet")
    finally:
        os.chmod(out, 0o755)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "not writable" in res.stderr


def test_cli_ctrl_c_prints_one_line(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        _green_png(src / f"{i:02}.png", 256, 256)
    out = tmp_path / "out"
    # The CLI keeps Python's own Ctrl-C handling, which a shell's background job (`make test &`, nohup)
    # starts without: SIGINT is ignored there, and Python then installs no handler. A terminal's Ctrl-C is
    # what this test plays, so the CLI starts with the default disposition.
    proc = subprocess.Popen([sys.executable, str(ROOT / "greenpost.py"), str(src), str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    def keyed_one() -> bool:
        return out.is_dir() and any(out.glob("*.png"))

    deadline = time.monotonic() + 600  # a loaded machine can take minutes to import torch and key one image
    while time.monotonic() < deadline and not keyed_one() and proc.poll() is None:
        time.sleep(0.05)
    if not keyed_one():
        proc.kill()
        pytest.fail(f"the CLI wrote no PNG before the interrupt was due (exit {proc.poll()}): {proc.communicate()[1]}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)  # it finishes the image in hand first
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporaries left"


# --- 16-bit and large images (defect 6, weak spot) -----------------------------------------------------
def test_cli_reads_16_bit_grey_png_by_value(tmp_path):
    from diffumatting.models.image_file import read_image

    src = tmp_path / "in"
    src.mkdir()
    ramp = (np.linspace(0, 65535, 32 * 24).reshape(24, 32)).astype(np.uint16)
    Image.fromarray(ramp).save(src / "grey16.png")
    img = read_image(src / "grey16.png")
    assert img.dtype == np.float32 and img.shape == (24, 32, 3)
    np.testing.assert_allclose(img[..., 0], ramp / 65535.0, atol=1e-6)
    assert img.min() == 0.0 and img.max() == 1.0  # not clipped to white
    res = _cli(src, tmp_path / "out", "--quiet")
    assert res.returncode == 0, res.stderr


def test_reads_16_bit_rgba_png_by_value(tmp_path):
    import cv2

    from diffumatting.models.image_file import read_image

    rgba = np.random.default_rng(0).integers(0, 65536, (9, 7, 4)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c.png"), rgba[..., [2, 1, 0, 3]])
    img = read_image(tmp_path / "c.png")
    np.testing.assert_allclose(img, rgba / 65535.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "1", "CMYK"])
def test_reads_every_pillow_mode_into_0_1(tmp_path, mode):
    from diffumatting.models.image_file import read_image

    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 5, 3)).astype(np.uint8))
    grey = np.asarray(base.convert("L"))
    if mode in ("I;16", "I"):  # 16-bit values
        im = Image.fromarray((grey.astype(np.uint16) * 257).astype(np.uint16)).convert(mode)
    elif mode == "F":  # float images hold 0..1
        im = Image.fromarray(grey.astype(np.float32) / 255)
    else:
        im = base.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("I", "F", "CMYK") else "x.png")
    im.save(path)
    img = read_image(path)
    assert img.dtype == np.float32 and img.shape[:2] == (6, 5) and img.shape[2] in (3, 4)
    assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    grey = grey.astype(np.float32) / 255
    if mode in ("L", "I;16", "I", "F", "LA"):
        np.testing.assert_allclose(img[..., 0], grey, atol=1.5 / 255)


def test_pixel_limit_refuses_before_decoding(tmp_path):
    from diffumatting.models.image_file import read_image

    Image.new("RGB", (400, 300), (0, 200, 0)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"400x300.*0\.12 MP.*limit of 0\.1 MP.*--max-megapixels"):
        read_image(tmp_path / "big.png", max_pixels=100_000)


def test_cli_pixel_limit_is_one_line(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (400, 300), (0, 200, 0)).save(src / "big.png")
    _green_png(src / "small.png")
    res = _cli(src, tmp_path / "out", "--quiet", "--max-megapixels", "0.1")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "big.png" in res.stderr and "--max-megapixels" in res.stderr
    assert (tmp_path / "out" / "small.png").is_file()
    bad = _cli(src, tmp_path / "out2", "--max-megapixels", "nan")
    assert bad.returncode == 2 and "--max-megapixels" in bad.stderr and "Traceback" not in bad.stderr


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (no pixel data): what a huge file looks like until decoded."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_150_mp_png_is_refused_from_its_header(tmp_path):
    import warnings

    from diffumatting.models.image_file import BYTES_PER_PIXEL, default_max_pixels, read_image

    path = _png_header_only(tmp_path / "huge.png", 12000, 12500)
    limit = default_max_pixels(available=16 * 2**30)
    assert limit == 16 * 2**30 // BYTES_PER_PIXEL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own bomb warning (150 MP is below its error limit)
        with pytest.raises(ValueError, match=r"huge\.png is 12000x12500 \(150\.00 MP\).*GiB of memory"):
            read_image(path, max_pixels=limit)


def test_default_pixel_limit_follows_available_memory():
    from diffumatting.models.image_file import BYTES_PER_PIXEL, default_max_pixels

    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert default_max_pixels() == pytest.approx(available / BYTES_PER_PIXEL, rel=0.3)


# --- matting-head files (defect 2) ----------------------------------------------------------------------
def _head_file(path, config_json: str, tensors: dict):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"kind": "matting_head", "format_version": "1", "vae_family": "sd1",
                                            "config": config_json})
    return path


def test_head_claiming_huge_widths_is_refused_without_allocating(tmp_path):
    import json
    import resource

    from diffumatting.models.matting_head import load_head

    config = {"fine_channels": 12000, "hidden": 12000, "coarse_channels": [12000], "coarse_taps": ["up.1.block.2"]}
    path = _head_file(tmp_path / "evil.safetensors", json.dumps(config), {"x": torch.zeros(1)})
    assert path.stat().st_size < 400
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="fine_channels=12000.*at most") as err:
        load_head(path)
    assert "evil.safetensors" in str(err.value)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50, f"refusing the head cost {grown_mb:.0f} MB"


def test_head_with_in_bound_config_but_wrong_tensors_is_refused_before_building(tmp_path, monkeypatch):
    import json

    from diffumatting.models import matting_head

    devices = []
    init = matting_head.MattingHead.reset_parameters
    monkeypatch.setattr(matting_head.MattingHead, "reset_parameters",
                        lambda self, seed=None: devices.append(self.fine.weight.device.type) or init(self, seed))
    config = {"fine_channels": 2048, "hidden": 512}
    path = _head_file(tmp_path / "h.safetensors", json.dumps(config), {"fine.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="do not match its architecture config"):
        matting_head.load_head(path)
    assert devices and set(devices) == {"meta"}, f"the head was allocated ({devices}) before its tensors were checked"


def test_head_with_nan_weights_is_refused(tmp_path):
    from diffumatting.models.matting_head import HeadConfig, MattingHead, load_head, save_head

    head = MattingHead(HeadConfig(fine_channels=8, coarse_channels=(8,), hidden=4, coarse_dim=2))
    with torch.no_grad():
        head.mix.weight.fill_(float("nan"))
    path = save_head(tmp_path / "nan.safetensors", head, "sd1")
    with pytest.raises(ValueError, match=r"mix\.weight.*NaN"):
        load_head(path)
