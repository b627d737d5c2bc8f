"""The refiner's procedural training data: determinism, ranges, the compositing equation, kinds, alpha."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from diffumatting.models.atomic import write_bytes_atomic
from diffumatting.training.refiner_data import (DEMOSAIC, KINDS, MIN_COVER, _demosaic, contact_sheet,
                                                jpeg_420, linear_to_srgb, make_batch, make_sample, sensor_noise,
                                                srgb_to_linear)

ARRAYS = ("image", "alpha", "fg", "backing")


def test_same_seed_same_sample_other_seed_differs():
    for seed in (0, 7, 123456789):
        a, b = make_sample(seed, 64), make_sample(seed, 64)
        assert a["kind"] == b["kind"]
        for name in ARRAYS:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"seed {seed} {name}")
    c = make_sample(1, 64)
    assert not np.array_equal(make_sample(0, 64)["image"], c["image"])


def test_no_global_rng_use():
    np.random.seed(5)
    before = np.random.random()
    np.random.seed(5)
    make_sample(3, 48)
    assert np.random.random() == before  # the global stream was not advanced


@pytest.mark.parametrize("size", [48, 256])
def test_shapes_dtypes_ranges(size):
    for seed in range(4):
        d = make_sample(seed, size)
        assert d["kind"] in KINDS
        assert d["image"].shape == d["fg"].shape == d["backing"].shape == (size, size, 3)
        assert d["alpha"].shape == (size, size)
        for name in ARRAYS:
            x = d[name]
            assert x.dtype == np.float32, name
            assert np.isfinite(x).all(), name
            assert x.min() >= 0.0 and x.max() <= 1.0, (name, x.min(), x.max())


@pytest.mark.parametrize("kind", KINDS)
def test_compositing_equation_holds_before_camera(kind):
    for seed in (11, 12):
        clean = make_sample(seed, 96, camera_effects=False, kind=kind)
        a = clean["alpha"][..., None]
        np.testing.assert_allclose(clean["image"], a * clean["fg"] + (1 - a) * clean["backing"], atol=2e-6)
        shot = make_sample(seed, 96, kind=kind)
        for name in ("alpha", "fg", "backing"):  # the camera changes only the photo
            np.testing.assert_array_equal(clean[name], shot[name])
        assert np.abs(shot["image"] - clean["image"]).mean() < 0.05


def test_camera_changes_most_photos():
    changed = 0
    for seed in range(8):
        clean = make_sample(seed, 96, camera_effects=False)["image"]
        changed += float(np.abs(make_sample(seed, 96)["image"] - clean).mean()) > 0.002
    assert changed >= 6


def test_sensor_noise_is_channel_correlated_and_grows_with_light():
    rng = np.random.default_rng(0)
    for _ in range(4):
        dark = np.full((64, 64, 3), 0.05, np.float32)
        state = rng.bit_generator.state
        n_dark = sensor_noise(rng, dark) - dark
        rng.bit_generator.state = state  # the same draw on a bright image
        n_bright = sensor_noise(rng, dark + 0.85) - (dark + 0.85)
        corr = np.corrcoef(n_dark.reshape(-1, 3).T)
        assert corr[0, 1] > 0.05 and corr[1, 2] > 0.05
        assert n_bright.std() >= n_dark.std() * 0.999


def test_jpeg_subsamples_chroma():
    # columns alternating two colours of about the same luma: 4:2:0 averages their chroma
    img = np.zeros((32, 32, 3), np.float32)
    img[:, 0::2] = (0.7, 0.3, 0.5)
    img[:, 1::2] = (0.3, 0.5, 0.5)
    out = jpeg_420(img, 98)
    before = np.abs(img[:, 0::2] - img[:, 1::2]).mean()
    after = np.abs(out[8:-8, 8:-8:2] - out[8:-8, 9:-8:2]).mean()
    assert after < 0.5 * before


def test_every_kind_appears_and_every_object_is_in_frame():
    seen, covers = set(), []
    for s in range(150):
        d = make_sample(s, 40)
        seen.add(d["kind"])
        covers.append(float(d["alpha"].mean()))
    assert seen == set(KINDS)
    assert min(covers) >= 0.9 * MIN_COVER  # (motion blur may push a little of it out of the frame)


def _fractions(alpha):
    return float((alpha == 0).mean()), float((alpha == 1).mean()), float(((alpha > 0.02) & (alpha < 0.98)).mean())


@pytest.mark.parametrize("kind", ["hair", "fur", "smoke", "glass", "motion"])
def test_soft_kinds_have_soft_alpha_and_clean_backing(kind):
    for seed in range(3):
        a = make_sample(seed, 128, camera_effects=False, kind=kind)["alpha"]
        zero, _, soft = _fractions(a)
        assert soft > 0.01, (kind, seed, soft)
        assert zero > 0.05, (kind, seed, zero)


@pytest.mark.parametrize("kind", ["hair", "fur", "solid", "foliage", "text"])
def test_solid_kinds_are_exactly_opaque_inside(kind):
    for seed in range(3):
        a = make_sample(seed, 128, camera_effects=False, kind=kind)["alpha"]
        zero, one, soft = _fractions(a)
        assert zero > 0.05 and one > 0.002, (kind, seed, zero, one)
        assert soft < 0.5, (kind, seed, soft)


def test_hair_strands_are_thin_and_partly_transparent():
    a = make_sample(2, 256, camera_effects=False, kind="hair")["alpha"]
    soft = (a > 0) & (a < 1)
    # most soft pixels are strands: a 3x3 neighbourhood holds no fully opaque pixel
    near_solid = cv2.dilate((a == 1).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert (soft & ~near_solid).sum() > 0.5 * soft.sum()
    assert (a[soft & ~near_solid] < 0.5).mean() > 0.3  # sub-pixel strands cover a pixel only partly


def test_batch_stacks_samples():
    b = make_batch([4, 5, 6], 48)
    assert b["image"].shape == (3, 48, 48, 3) and b["alpha"].shape == (3, 48, 48)
    np.testing.assert_array_equal(b["alpha"][1], make_sample(5, 48)["alpha"])
    assert b["kind"] == [make_sample(s, 48)["kind"] for s in (4, 5, 6)]


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": -1}, "seed=-1"), ({"seed": 1.5}, "seed=1.5"), ({"seed": 0, "size": 8}, "size=8"),
    ({"seed": 0, "size": 5000}, "size=5000"), ({"seed": 0, "kind": "cat"}, "kind='cat'"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sample(**kwargs)
    with pytest.raises(ValueError, match="seeds is empty"):
        make_batch([])


def test_contact_sheet_written(artifacts_dir):
    sheet = contact_sheet(range(12), 96, columns=2)
    assert sheet.dtype == np.uint8 and sheet.shape[2] == 3 and sheet.shape[0] == 6 * 98
    ok, png = cv2.imencode(".png", sheet[..., ::-1])
    assert ok
    write_bytes_atomic(artifacts_dir / "refiner_data_sheet.png", png.tobytes())


def test_rectangular_size():
    d = make_sample(9, (48, 80))
    assert d["image"].shape == (48, 80, 3) and d["alpha"].shape == (48, 80)
    with pytest.raises(ValueError, match=r"size=\(48, 8\)"):
        make_sample(9, (48, 8))


def test_demosaic_keeps_flat_colours():
    flat = np.broadcast_to(np.array([0.8, 0.3, 0.1], np.float32), (16, 16, 3)).copy()
    for code in DEMOSAIC:  # each interpolation the camera may pick, with the mosaic's colour order
        out = _demosaic(flat, code)
        np.testing.assert_allclose(out[4:-4, 4:-4], flat[4:-4, 4:-4], atol=1.5 / 255)


def test_linear_light_mix():
    x = np.linspace(0, 1, 101, dtype=np.float32)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-5)
    for kind in ("hair", "smoke"):
        disp = make_sample(21, 96, camera_effects=False, kind=kind)
        lin = make_sample(21, 96, camera_effects=False, kind=kind, light="linear")
        for name in ("alpha", "fg", "backing"):
            np.testing.assert_array_equal(disp[name], lin[name])
        a = lin["alpha"][..., None]
        mix = a * srgb_to_linear(lin["fg"]) + (1 - a) * srgb_to_linear(lin["backing"])
        np.testing.assert_allclose(srgb_to_linear(lin["image"]), mix, atol=1e-5)
        soft = (lin["alpha"] > 0.2) & (lin["alpha"] < 0.8)
        assert np.abs(lin["image"] - disp["image"])[soft].mean() > 0.005  # the two mixes differ on edges
    with pytest.raises(ValueError, match="light='gamma'"):
        make_sample(0, 48, light="gamma")
