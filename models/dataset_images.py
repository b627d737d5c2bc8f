"""Image helpers of the dataset factory: PNG reading, composites over backgrounds, the contact sheet.

Float arrays in [0, 1]; `fg` is straight (not premultiplied) colour, `alpha` opacity (1 = object).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_png_float(data: bytes, what: str) -> np.ndarray:
    """Decode PNG bytes (8 or 16 bit, grey/RGB/RGBA) to float32 in [0, 1], channels in RGB(A) order."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"{what}: not a readable image ({len(data)} bytes)")
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    x = arr.astype(np.float32) / scale
    if x.ndim == 3:
        x = x[..., [2, 1, 0, 3]] if x.shape[-1] == 4 else x[..., ::-1]
    return np.ascontiguousarray(x)


def read_image_file(path) -> np.ndarray:
    """An RGB float image from a file; a clear error for unreadable files."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise ValueError(f"{path}: not a readable image; remove it or convert it to PNG/JPEG")
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    x = arr.astype(np.float32) / scale
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    return np.ascontiguousarray(x[..., :3][..., ::-1])


def composite(fg: np.ndarray, alpha: np.ndarray, background: np.ndarray,
              rng: np.random.Generator, scale_range=(0.5, 0.9)) -> tuple[np.ndarray, np.ndarray, dict]:
    """Place the object over `background` at a random scale and position.

    The object's bounding box is scaled so its longer side is a random share of the background's shorter
    side, then placed at a random position fully inside. Returns (rgb, alpha of the placed object, the
    placement {scale, x, y, w, h}).
    """
    ys, xs = np.nonzero(alpha > 0.0)
    H, W = background.shape[:2]
    if ys.size == 0:
        return background.copy(), np.zeros((H, W), np.float32), {"scale": 0.0, "x": 0, "y": 0, "w": 0, "h": 0}
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop_a = alpha[y0:y1, x0:x1]
    crop_f = fg[y0:y1, x0:x1]
    share = float(rng.uniform(*scale_range))
    s = share * min(H, W) / max(crop_a.shape)
    w = max(1, min(W, int(round(crop_a.shape[1] * s))))
    h = max(1, min(H, int(round(crop_a.shape[0] * s))))
    a = cv2.resize(crop_a, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    f = cv2.resize(crop_f, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    x = int(rng.integers(0, W - w + 1))
    y = int(rng.integers(0, H - h + 1))
    out_a = np.zeros((H, W), np.float32)
    out_a[y:y + h, x:x + w] = np.clip(a, 0.0, 1.0)
    out = background.astype(np.float32).copy()
    region = out[y:y + h, x:x + w]
    out[y:y + h, x:x + w] = np.clip(f, 0, 1) * a[..., None] + region * (1.0 - a[..., None])
    return out, out_a, {"scale": round(s, 4), "x": x, "y": y, "w": w, "h": h}


def checkerboard(h: int, w: int, cell: int = 8, light: float = 0.8, dark: float = 0.6) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    board = np.where(((yy // cell) + (xx // cell)) % 2 == 0, light, dark).astype(np.float32)
    return np.repeat(board[..., None], 3, axis=-1)


def contact_sheet(tiles: list[tuple[np.ndarray, np.ndarray]], cell: int = 128, columns: int | None = None,
                  gap: int = 4, marked: list[bool] | None = None) -> np.ndarray:
    """A grid of (fg, alpha) tiles composited over a checkerboard, each fitted into cell x cell. RGB float.

    Tiles whose `marked` flag is set (rejected samples) get a red frame in the gap around them."""
    if not tiles:
        raise ValueError("contact sheet of no samples: nothing was produced")
    n = len(tiles)
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    sheet = np.full((rows * (cell + gap) + gap, cols * (cell + gap) + gap, 3), 0.15, np.float32)
    board = checkerboard(cell, cell)
    for i, (fg, alpha) in enumerate(tiles):
        h, w = alpha.shape
        s = cell / max(h, w)
        th, tw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        f = cv2.resize(np.asarray(fg, np.float32), (tw, th), interpolation=interp)
        a = cv2.resize(np.asarray(alpha, np.float32), (tw, th), interpolation=interp)[..., None]
        tile = board.copy()
        oy, ox = (cell - th) // 2, (cell - tw) // 2
        tile[oy:oy + th, ox:ox + tw] = np.clip(f, 0, 1) * a + tile[oy:oy + th, ox:ox + tw] * (1 - a)
        r, c = divmod(i, cols)
        y, x = gap + r * (cell + gap), gap + c * (cell + gap)
        if marked is not None and marked[i]:
            sheet[y - gap // 2:y + cell + gap // 2, x - gap // 2:x + cell + gap // 2] = (0.9, 0.1, 0.1)
        sheet[y:y + cell, x:x + cell] = tile
    return sheet
