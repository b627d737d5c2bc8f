"""Pure tests of models/alpha.py, models/png.py and models/atomic.py (no ComfyUI)."""
from __future__ import annotations

import io as _io

import numpy as np
import pytest
import torch
from PIL import Image

from diffumatting.models.alpha import checkerboard, join_alpha, over, parse_hex_color, split_alpha, trim_to_alpha
from diffumatting.models.atomic import write_all_atomic
from diffumatting.models.png import encode_png, read_png_text


def test_join_split_round_trip_both_conventions():
    rgb = torch.rand(2, 5, 7, 3)
    alpha = torch.rand(2, 5, 7)
    rgba = join_alpha(rgb, alpha=alpha)
    assert rgba.shape == (2, 5, 7, 4)
    back_rgb, back_alpha, tmask = split_alpha(rgba)
    torch.testing.assert_close(back_rgb, rgb)
    torch.testing.assert_close(back_alpha, alpha)
    torch.testing.assert_close(tmask, 1 - alpha)
    # The core convention (transparency mask) gives the same RGBA without any inversion by the user.
    torch.testing.assert_close(join_alpha(rgb, transparency_mask=1 - alpha), rgba)


def test_join_uses_existing_alpha_grey_and_broadcast_mask():
    rgba = torch.rand(3, 4, 4, 4)
    torch.testing.assert_close(join_alpha(rgba), rgba)
    grey = torch.rand(1, 4, 4, 1)
    out = join_alpha(grey, alpha=torch.ones(4, 4) * 0.5)
    assert out.shape == (1, 4, 4, 4)
    torch.testing.assert_close(out[..., 0], grey[..., 0])
    assert torch.all(out[..., 3] == 0.5)
    batch = join_alpha(torch.rand(3, 4, 4, 3), alpha=torch.zeros(1, 4, 4))
    assert torch.all(batch[..., 3] == 0)


def test_mask_is_resized_and_bad_batch_refused():
    out = join_alpha(torch.rand(1, 8, 8, 3), alpha=torch.ones(1, 4, 4))
    assert out.shape == (1, 8, 8, 4)
    with pytest.raises(ValueError, match="batch size 2 but the image has 3"):
        join_alpha(torch.rand(3, 4, 4, 3), alpha=torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"\(B,H,W,C\)"):
        join_alpha(torch.rand(1, 4, 4, 2))


def test_over_checkerboard_and_color():
    rgba = torch.zeros(1, 4, 4, 4)
    rgba[..., 0] = 1.0
    rgba[0, 0, 0, 3] = 1.0
    out = over(rgba, torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(out[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(out[0, 1, 1], torch.tensor([0.0, 0.0, 1.0]))
    board = checkerboard(4, 4, cell=2)
    assert board[0, 0, 0] != board[0, 2, 0] and board[0, 0, 0] == board[2, 2, 0]


@pytest.mark.parametrize("text,expected", [("#00ff00", (0.0, 1.0, 0.0)), ("0f0", (0.0, 1.0, 0.0))])
def test_parse_hex(text, expected):
    assert parse_hex_color(text) == pytest.approx(expected)


def test_parse_hex_bad():
    with pytest.raises(ValueError, match="#RRGGBB"):
        parse_hex_color("green")


def test_trim_to_alpha_with_padding_and_empty():
    rgba = torch.zeros(10, 12, 4)
    rgba[3:5, 4:9, 3] = 1.0
    crop = trim_to_alpha(rgba, padding=2)
    assert crop.shape == (2 + 4, 5 + 4, 4)
    assert crop[2:4, 2:7, 3].min() == 1 and crop[:2].abs().sum() == 0
    assert trim_to_alpha(torch.zeros(5, 5, 4)).shape == (1, 1, 4)
    with pytest.raises(ValueError, match="padding"):
        trim_to_alpha(rgba, padding=-1)


@pytest.mark.parametrize("bits", [8, 16])
def test_png_rgba_round_trip_with_text(bits):
    rng = np.random.default_rng(0)
    px = rng.random((9, 13, 4)).astype(np.float32)
    data = encode_png(px, bits=bits, text={"prompt": '{"a": 1}', "workflow": "wörk"})
    img = Image.open(_io.BytesIO(data))
    arr = np.asarray(img) if bits == 8 else None
    if bits == 8:
        assert img.mode == "RGBA"
        assert np.abs(arr.astype(np.float32) / 255 - px).max() <= 0.5 / 255 + 1e-6
    else:
        import cv2

        dec = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert dec.dtype == np.uint16 and dec.shape == (9, 13, 4)
        rgba = dec[..., [2, 1, 0, 3]].astype(np.float32) / 65535
        assert np.abs(rgba - px).max() <= 0.5 / 65535 + 1e-6
    assert read_png_text(data) == {"prompt": '{"a": 1}', "workflow": "wörk"}


def test_png_bad_input():
    with pytest.raises(ValueError, match="bits must be 8 or 16"):
        encode_png(np.zeros((2, 2)), bits=12)
    with pytest.raises(ValueError, match="non-empty"):
        encode_png(np.zeros((0, 2, 3)))


def test_write_all_atomic_all_or_nothing(tmp_path):
    good = tmp_path / "a.png"
    bad = tmp_path / "missing_dir_is_a_file"
    bad.write_text("x")
    with pytest.raises(OSError):
        write_all_atomic([(good, b"1"), (bad / "b.png", b"2")])
    assert not good.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing_dir_is_a_file"]
    written = write_all_atomic([(tmp_path / "x" / "c.png", b"3")])
    assert written[0].read_bytes() == b"3"
