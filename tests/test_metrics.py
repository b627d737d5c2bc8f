"""models/metrics.py on hand-made cases with known values, and against an independent scipy filter."""
from __future__ import annotations

import numpy as np
import pytest

from diffumatting.models import metrics as M


def test_sad_and_mse_known_values():
    gt = np.zeros((10, 10))
    pred = np.ones((10, 10))
    assert M.sad(pred, gt) == pytest.approx(0.1)
    region = np.zeros((10, 10), bool)
    region[:2] = True
    assert M.sad(pred, gt, region) == pytest.approx(0.02)
    pred2 = np.zeros((10, 10))
    pred2[0, :4] = 0.5
    assert M.mse(pred2, gt) == pytest.approx(4 * 0.25 / 100)
    assert M.mse(pred2, gt, region) == pytest.approx(4 * 0.25 / 20)
    assert M.mse(pred2, gt, np.zeros((10, 10), bool)) == 0.0


def test_gradient_error_properties_and_reference():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    gt = np.clip(rng.random((20, 24)), 0, 1)
    assert M.gradient_error(gt, gt) == 0.0
    # a constant offset does not change gradients (away from nothing: borders are replicated)
    assert M.gradient_error(np.clip(gt * 0.5 + 0.25, 0, 1), gt * 0.5 + 0.25) == pytest.approx(0.0, abs=1e-12)
    # independent implementation: scipy convolution with replicated borders
    hx = M._gauss_derivative_kernel(1.4)
    assert hx.shape == (9, 9) and np.sqrt((hx ** 2).sum()) == pytest.approx(1.0)
    pred = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1)

    def mag(a):
        gx = ndimage.convolve(a, hx, mode="nearest")
        gy = ndimage.convolve(a, hx.T, mode="nearest")
        return np.sqrt(gx ** 2 + gy ** 2)

    ref = ((mag(pred) - mag(gt)) ** 2).sum() / 1000
    assert M.gradient_error(pred, gt) == pytest.approx(ref, rel=1e-9)
    # a linear ramp has a constant gradient magnitude inside: slope * sum_v v * hx
    ramp = np.tile(np.arange(30, dtype=np.float64) * 0.01, (30, 1))
    g = M.gradient_magnitude(ramp)
    expect = 0.01 * abs((hx * (np.arange(9) - 4)[None, :]).sum())
    assert np.allclose(g[10:20, 10:20], expect)


def test_connectivity_known_blob():
    gt = np.zeros((10, 10))
    gt[2:7, 2:7] = 1
    assert M.connectivity_error(gt, gt) == 0.0
    pred = gt.copy()
    pred[8:10, 8:10] = 1  # 4 pixels disconnected from the object
    assert M.connectivity_error(pred, gt) == pytest.approx(4 / 1000)
    # a faint disconnected blob below theta adds nothing
    pred3 = gt.copy()
    pred3[8:10, 8:10] = 0.1
    assert M.connectivity_error(pred3, gt) == pytest.approx(0.0)
    region = np.zeros((10, 10), bool)
    assert M.connectivity_error(pred, gt, region) == 0.0


def test_foreground_error_weighted_by_gt_alpha():
    gt_fg = np.zeros((4, 4, 3))
    alpha = np.zeros((4, 4))
    alpha[0, :2] = 0.5
    alpha[1, :] = 1.0
    pred = gt_fg.copy()
    pred[0, :2] = 0.1  # error 0.1 on the two half-transparent pixels
    pred[3, :] = 0.9   # errors where gt alpha is 0 do not count
    expect = (2 * 0.5 * 0.1) / (2 * 0.5 + 4 * 1.0)
    assert M.foreground_error(pred, gt_fg, alpha) == pytest.approx(expect)
    assert M.foreground_error(pred, gt_fg, np.zeros((4, 4))) == 0.0


def test_all_metrics_and_bad_shapes():
    gt = np.zeros((6, 6))
    out = M.all_metrics(gt, gt, gt > 1, np.zeros((6, 6, 3)), np.zeros((6, 6, 3)))
    assert set(out) == {"sad", "mse", "grad", "conn", "fg", "fg_edge"} and all(v == 0 for v in out.values())
    with pytest.raises(ValueError, match="same size"):
        M.sad(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="trimap == 128"):
        M.mse(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="HxWxC"):
        M.foreground_error(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 4)))
