"""Matting metrics, as defined by the DIM / alphamatting.com evaluation code (test and benchmark support;
not part of the pack).

Every function takes float arrays in [0, 1] (alpha HxW, colour HxWx3) and an optional `region`
(HxW bool, e.g. `trimap == 128`, the unknown band): the sum or mean runs over the region, or over the
whole image when `region` is None. Sums are divided by 1000 as the reference code does.

- sad:           sum |a - gt| / 1000
- mse:           mean (a - gt)^2
- gradient:      sum (|grad a| - |grad gt|)^2 / 1000, Gaussian-derivative gradients, sigma 1.4
- connectivity:  sum |phi(a) - phi(gt)| / 1000, threshold step 0.1, theta 0.15, 4-connectivity
- foreground_error: alpha-weighted MEAN ABSOLUTE error of the straight foreground colour,
  sum_{gt > 0} gt * mean_c |F - F_gt| / sum_{gt > 0} gt (over the region when given).

numpy + OpenCV only.
"""
from __future__ import annotations

import cv2
import numpy as np


def _check(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(f"alpha shapes {pred.shape} and {gt.shape}: expected two HxW arrays of the same size; "
                         f"pass single-channel mattes (take one channel of a grey image)")
    if region is None:
        region = np.ones(gt.shape, bool)
    else:
        region = np.asarray(region, bool)
        if region.shape != gt.shape:
            raise ValueError(f"region shape {region.shape} differs from the alpha's {gt.shape}; pass an HxW mask "
                             f"such as trimap == 128")
    return pred, gt, region


def sad(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Sum of absolute differences / 1000."""
    pred, gt, region = _check(pred, gt, region)
    return float(np.abs(pred - gt)[region].sum() / 1000.0)


def mse(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean squared error over the region (0 when the region is empty)."""
    pred, gt, region = _check(pred, gt, region)
    n = int(region.sum())
    return float(((pred - gt) ** 2)[region].sum() / n) if n else 0.0


def _gauss_derivative_kernel(sigma: float = 1.4) -> np.ndarray:
    """The reference code's gaussgradient kernel hx: gauss(row) * dgauss(col), unit L2 norm."""
    epsilon = 1e-2
    half = int(np.ceil(sigma * np.sqrt(-2.0 * np.log(np.sqrt(2.0 * np.pi) * sigma * epsilon))))
    u = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-u ** 2 / (2 * sigma ** 2)) / (sigma * np.sqrt(2 * np.pi))
    dg = -u * g / sigma ** 2
    hx = g[:, None] * dg[None, :]
    return hx / np.sqrt((hx * hx).sum())


def gradient_magnitude(alpha: np.ndarray, sigma: float = 1.4) -> np.ndarray:
    """Gaussian-derivative gradient magnitude with replicated borders."""
    hx = _gauss_derivative_kernel(sigma)
    a = np.asarray(alpha, np.float64)
    gx = cv2.filter2D(a, cv2.CV_64F, hx, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.filter2D(a, cv2.CV_64F, hx.T.copy(), borderType=cv2.BORDER_REPLICATE)
    return np.sqrt(gx * gx + gy * gy)


def gradient_error(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None,
                   sigma: float = 1.4) -> float:
    """Gradient error / 1000."""
    pred, gt, region = _check(pred, gt, region)
    err = (gradient_magnitude(pred, sigma) - gradient_magnitude(gt, sigma)) ** 2
    return float(err[region].sum() / 1000.0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    if n <= 1:
        return np.zeros(mask.shape, bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def connectivity_error(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None,
                       step: float = 0.1, theta: float = 0.15) -> float:
    """Connectivity error / 1000 (Rhemann et al. 2009, as in the DIM evaluation code)."""
    pred, gt, region = _check(pred, gt, region)
    steps = np.arange(0.0, 1.0 + step / 2, step)
    level = np.full(gt.shape, -1.0)
    for i in range(1, len(steps)):
        omega = _largest_component((pred >= steps[i]) & (gt >= steps[i]))
        level[(level == -1) & ~omega] = steps[i - 1]
    level[level == -1] = 1.0
    pd = pred - level
    td = gt - level
    pred_phi = 1.0 - pd * (pd >= theta)
    gt_phi = 1.0 - td * (td >= theta)
    return float(np.abs(pred_phi - gt_phi)[region].sum() / 1000.0)


def foreground_error(pred_fg: np.ndarray, gt_fg: np.ndarray, gt_alpha: np.ndarray,
                     region: np.ndarray | None = None) -> float:
    """Alpha-weighted mean absolute error of the straight foreground, where gt alpha > 0."""
    pred_fg = np.asarray(pred_fg, np.float64)
    gt_fg = np.asarray(gt_fg, np.float64)
    a = np.asarray(gt_alpha, np.float64)
    if pred_fg.shape != gt_fg.shape or pred_fg.ndim != 3 or pred_fg.shape[:2] != a.shape:
        raise ValueError(f"foreground shapes {pred_fg.shape}, {gt_fg.shape} and alpha {a.shape}: expected two "
                         f"HxWxC colour arrays and an HxW alpha of the same size")
    _, _, region = _check(a, a, region)
    w = np.where(region & (a > 0), a, 0.0)
    total = w.sum()
    if total <= 0:
        return 0.0
    err = np.abs(pred_fg - gt_fg).mean(axis=2)
    return float((w * err).sum() / total)


def all_metrics(pred: np.ndarray, gt: np.ndarray, unknown: np.ndarray | None = None,
                pred_fg: np.ndarray | None = None, gt_fg: np.ndarray | None = None) -> dict[str, float]:
    """The benchmark's set: SAD, gradient and connectivity over the whole image (a keyer must keep the
    backing clean too), SAD (`sad_unk`) and MSE over `unknown` (the trimap's band; whole image when None), and the
    foreground errors when both foregrounds are given: `fg` where gt > 0, `fg_edge` only where 0 < gt < 1
    (the transition, where keyers differ; inside, the photo's own noise dominates `fg`)."""
    out = {"sad": sad(pred, gt), "sad_unk": sad(pred, gt, unknown), "mse": mse(pred, gt, unknown),
           "grad": gradient_error(pred, gt), "conn": connectivity_error(pred, gt)}
    if pred_fg is not None and gt_fg is not None:
        out["fg"] = foreground_error(pred_fg, gt_fg, gt)
        g = np.asarray(gt)
        out["fg_edge"] = foreground_error(pred_fg, gt_fg, gt, (g > 0) & (g < 1))
    return out
