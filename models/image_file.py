"""Read an image file as float RGB(A) in [0, 1], by value, whatever its bit depth and mode.

Pillow opens 16-bit greyscale PNGs as `I;16`/`I` and 16-bit colour PNGs as 8-bit RGB(A); a plain
`convert("RGB")` clips the first to white and drops the low byte of the second. Here 16-bit PNGs are read
with OpenCV (all 16 bits of every channel), `I;16`/`I` (16-bit) and `F` (float) images are scaled by
value, as core's LoadImage does for `I`, and everything else goes through Pillow. EXIF orientation is
applied. The pixel count is checked from the header, before anything is decoded.

Shared by the greenpost.py CLI and the trainer's data loader. Plain numpy/Pillow/OpenCV, no torch.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Peak memory of keying one pixel with GreenPost (float32 planes of the keyer, the decoded file, the
# outputs), measured with ru_maxrss on 1-4 MP images on CPU: about 190-200 bytes.
BYTES_PER_PIXEL = 200
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_EXIF_ORIENTATION = 0x0112


def available_memory() -> int | None:
    """Bytes the system can give without swapping (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_max_pixels(available: int | None = None) -> int | None:
    """The largest image GreenPost can key in the memory available now (None: no limit known)."""
    available = available_memory() if available is None else available
    return None if available is None else int(available // BYTES_PER_PIXEL)


def check_pixel_count(name: str, width: int, height: int, max_pixels: int | None,
                      limit_option: str = "--max-megapixels") -> None:
    """A ValueError naming the size, the limit and the fix when width x height exceeds `max_pixels`."""
    if max_pixels is None or width * height <= max_pixels:
        return
    mp, limit = width * height / 1e6, max_pixels / 1e6
    raise ValueError(f"{name} is {width}x{height} ({mp:.2f} MP), above the limit of {limit:.3g} MP: keying it "
                     f"needs about {width * height * BYTES_PER_PIXEL / 2**30:.1f} GiB of memory. Downscale or "
                     f"crop it, or raise the limit with {limit_option} if this machine has the memory")


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) == 26 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        return head[24]
    return None


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an (H, W, C) array."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 1)[::-1],
           8: lambda a: np.rot90(a, 1)}
    op = ops.get(int(orientation or 1))
    return np.ascontiguousarray(op(arr)) if op else arr


def _read_png16(path: Path, orientation: int) -> np.ndarray:
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.dtype != np.uint16:
        raise ValueError(f"{path.name}: the 16-bit PNG could not be decoded (damaged or truncated file)")
    if raw.ndim == 2:
        raw = raw[..., None]
    if raw.shape[-1] in (3, 4):
        raw = raw[..., [2, 1, 0, 3][:raw.shape[-1]]]  # OpenCV gives BGR(A)
    return _orient(raw.astype(np.float32) / 65535.0, orientation)


def _pillow_to_float(im) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float32) / 65535.0  # 16-bit values, as core's LoadImage scales `I`
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
    else:
        has_alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info)
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB"), np.float32) / 255.0
    return arr[..., None]


def read_image(path: str | os.PathLike, max_pixels: int | None = None,
               limit_option: str = "--max-megapixels") -> np.ndarray:
    """(H, W, 3) RGB or (H, W, 4) straight RGBA float32 in [0, 1] from an image file.

    Refuses, with a ValueError naming the file and the fix: files that are not images, images above
    `max_pixels` (checked before decoding; the message names `limit_option` as the way to raise it) and float images with NaN or infinite values.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{path.name} is not an image Pillow can read (png, jpg, webp, tiff ...)") from None
    with im:
        check_pixel_count(path.name, im.width, im.height, max_pixels, limit_option)
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        if im.format == "PNG" and _png_bit_depth(path) == 16:
            arr = _read_png16(path, orientation)
        else:
            arr = _pillow_to_float(ImageOps.exif_transpose(im))
    if not np.isfinite(arr).all():
        raise ValueError(f"{path.name} holds NaN or infinite pixel values; save it again as a normal image")
    arr = np.clip(arr, 0.0, 1.0)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 2:
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=-1), arr[..., 1:]], axis=-1)
    return np.ascontiguousarray(arr, dtype=np.float32)
