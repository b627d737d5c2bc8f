"""tests/support/metrics.py against hand-computed values and against references written here from the
definitions of the DIM / alphamatting.com evaluation code (gaussgradient + imfilter 'replicate' for the
gradient error; threshold-stepped largest 4-connected component for the connectivity error), so a bug in
the module's own kernel or loop cannot agree with itself."""
from __future__ import annotations

import math

import numpy as np
import pytest
from support import metrics

ndimage = pytest.importorskip("scipy.ndimage")


def test_sad_and_mse_known_values():
    gt = np.zeros((10, 10))
    pred = np.ones((10, 10))
    assert metrics.sad(pred, gt) == pytest.approx(0.1)
    region = np.zeros((10, 10), bool)
    region[:2] = True
    assert metrics.sad(pred, gt, region) == pytest.approx(0.02)
    pred2 = np.zeros((10, 10))
    pred2[0, :4] = 0.5
    assert metrics.mse(pred2, gt) == pytest.approx(4 * 0.25 / 100)
    assert metrics.mse(pred2, gt, region) == pytest.approx(4 * 0.25 / 20)
    assert metrics.mse(pred2, gt, np.zeros((10, 10), bool)) == 0.0


def _reference_gradient(a: np.ndarray, sigma: float = 1.4) -> np.ndarray:
    """gaussgradient.m: hx(i, j) = gauss(i) * dgauss(j) on a (2h+1)^2 grid, scaled to unit L2 norm,
    applied by imfilter(..., 'replicate') (correlation), hy = hx'."""
    eps = 1e-2
    half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * eps)))
    size = 2 * half + 1
    hx = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            u, v = i - half, j - half
            gauss = math.exp(-u * u / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))
            dgauss = -v * math.exp(-v * v / (2 * sigma * sigma)) / (sigma ** 3 * math.sqrt(2 * math.pi))
            hx[i, j] = gauss * dgauss
    hx /= math.sqrt((hx * hx).sum())
    gx = ndimage.correlate(a, hx, mode="nearest")
    gy = ndimage.correlate(a, hx.T, mode="nearest")
    return np.sqrt(gx * gx + gy * gy)


def test_gradient_error_matches_reference():
    rng = np.random.default_rng(0)
    gt = ndimage.gaussian_filter(rng.random((31, 37)), 1.0)
    pred = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1)
    ref = ((_reference_gradient(pred) - _reference_gradient(gt)) ** 2).sum() / 1000
    assert ref > 1e-4
    assert metrics.gradient_error(pred, gt) == pytest.approx(ref, rel=1e-9)
    region = gt > 0.5
    ref_r = ((_reference_gradient(pred) - _reference_gradient(gt)) ** 2)[region].sum() / 1000
    assert metrics.gradient_error(pred, gt, region) == pytest.approx(ref_r, rel=1e-9)


def test_gradient_of_a_ramp_is_its_slope_times_the_kernel_moment():
    # a linear ramp a = s * x: the correlation with hx is s * sum_ij hx(i, j) * (j - half), a closed form
    # of the Gaussian derivative: for unit-norm hx that is s * sum_v v dg(v) * sum_u g(u) / ||g dg||.
    sigma, s = 1.4, 0.01
    half = 4
    u = np.arange(-half, half + 1)
    g = np.exp(-u ** 2 / (2 * sigma ** 2))
    dg = -u * g
    moment = abs((u * dg).sum() * g.sum()) / math.sqrt((g ** 2).sum() * (dg ** 2).sum())
    ramp = np.tile(np.arange(40, dtype=np.float64) * s, (40, 1))
    mag = metrics.gradient_magnitude(ramp)
    assert np.allclose(mag[10:30, 10:30], s * moment, rtol=1e-9)


def _reference_connectivity(pred, gt, step=0.1, theta=0.15):
    """compute_connectivity_error.m with scipy's 4-connected labelling."""
    thresholds = np.arange(0, 1 + step, step)
    l_map = -np.ones(gt.shape)
    for i in range(1, len(thresholds)):
        both = (pred >= thresholds[i]) & (gt >= thresholds[i])
        labels, n = ndimage.label(both)  # default structure = 4-connectivity
        omega = np.zeros(gt.shape, bool)
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            omega = labels == 1 + int(np.argmax(sizes))
        flip = (l_map == -1) & ~omega
        l_map[flip] = thresholds[i - 1]
    l_map[l_map == -1] = 1
    d_pred = pred - l_map
    d_gt = gt - l_map
    phi_pred = 1 - d_pred * (d_pred >= theta)
    phi_gt = 1 - d_gt * (d_gt >= theta)
    return np.abs(phi_pred - phi_gt).sum() / 1000


def test_connectivity_hand_computed():
    gt = np.zeros((10, 10))
    gt[2:7, 2:7] = 1
    assert metrics.connectivity_error(gt, gt) == 0.0
    pred = gt.copy()
    pred[8:10, 8:10] = 1  # 4 pixels disconnected from the object: level 0, phi 0 vs gt's 1
    assert metrics.connectivity_error(pred, gt) == pytest.approx(4 / 1000)
    # a pixel inside the object dropping to 0.55 leaves omega at 0.6: level 0.5, its d = 0.05 < theta
    # (phi 1) while gt's d = 0.5 (phi 0.5): error 0.5
    pred2 = gt.copy()
    pred2[4, 4] = 0.55
    assert metrics.connectivity_error(pred2, gt) == pytest.approx(0.5 / 1000)
    # a faint disconnected blob below theta adds nothing
    pred3 = gt.copy()
    pred3[8:10, 8:10] = 0.1
    assert metrics.connectivity_error(pred3, gt) == pytest.approx(0.0)
    assert metrics.connectivity_error(pred, gt, np.zeros((10, 10), bool)) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_connectivity_matches_reference(seed):
    rng = np.random.default_rng(seed)
    gt = np.clip(ndimage.gaussian_filter(rng.random((40, 50)), 3) * 6 - 2.5, 0, 1)
    pred = np.clip(gt + ndimage.gaussian_filter(rng.normal(0, 0.6, gt.shape), 1.5), 0, 1)
    ref = _reference_connectivity(pred, gt)
    assert ref > 1e-3
    assert metrics.connectivity_error(pred, gt) == pytest.approx(ref, rel=1e-9)


def test_foreground_error_weighted_by_gt_alpha():
    gt_fg = np.zeros((4, 4, 3))
    alpha = np.zeros((4, 4))
    alpha[0, :2] = 0.5
    alpha[1, :] = 1.0
    pred = gt_fg.copy()
    pred[0, :2] = 0.1  # error 0.1 on the two half-transparent pixels
    pred[3, :] = 0.9   # errors where gt alpha is 0 do not count
    expect = (2 * 0.5 * 0.1) / (2 * 0.5 + 4 * 1.0)
    assert metrics.foreground_error(pred, gt_fg, alpha) == pytest.approx(expect)
    pred[1, 0, 0] = 0.3  # one channel of an opaque pixel: its mean over channels is 0.1
    assert metrics.foreground_error(pred, gt_fg, alpha) == pytest.approx((2 * 0.5 * 0.1 + 0.1) / 5.0)
    assert metrics.foreground_error(pred, gt_fg, np.zeros((4, 4))) == 0.0


def test_all_metrics_known_values():
    gt = np.zeros((8, 8))
    gt[2:6, 2:6] = 1.0
    unknown = np.zeros((8, 8), bool)
    unknown[1:7, 1:7] = True
    unknown[2:6, 2:6] = False  # the 20-pixel ring around the object
    pred = gt.copy()
    pred[1, 1:7] = 0.5   # 6 ring pixels wrong by 0.5
    pred[7, 7] = 0.25    # one pixel outside the band wrong by 0.25
    fg_gt = np.zeros((8, 8, 3))
    fg_pred = fg_gt + 0.2
    out = metrics.all_metrics(pred, gt, unknown, fg_pred, fg_gt)
    assert out["sad"] == pytest.approx((6 * 0.5 + 0.25) / 1000)
    assert out["sad_unk"] == pytest.approx(6 * 0.5 / 1000)
    assert out["mse"] == pytest.approx(6 * 0.25 / 20)
    assert out["grad"] == pytest.approx(((_reference_gradient(pred) - _reference_gradient(gt)) ** 2).sum() / 1000)
    assert out["conn"] == pytest.approx(_reference_connectivity(pred, gt))
    assert out["fg"] == pytest.approx(0.2)
    assert out["fg_edge"] == 0.0  # gt has no partial pixels


def test_bad_shapes():
    with pytest.raises(ValueError, match="same size"):
        metrics.sad(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="trimap == 128"):
        metrics.mse(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="HxWxC"):
        metrics.foreground_error(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 4)))
