"""PNG encoding for transparent exports: 8- or 16-bit, with text metadata (prompt, workflow)."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def text_chunk(key: str, value: str) -> bytes:
    """A tEXt chunk for Latin-1 text, else an uncompressed iTXt chunk (UTF-8)."""
    if not 1 <= len(key) <= 79:
        raise ValueError(f"PNG text key {key!r} must have 1 to 79 characters")
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def encode_png(pixels: np.ndarray, bits: int = 8, text: dict[str, str] | None = None,
               compress_level: int = 4) -> bytes:
    """Encode float pixels in [0,1], (H,W) grey, (H,W,3) RGB or (H,W,4) straight RGBA, as PNG bytes."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    arr = np.asarray(pixels, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or arr.size == 0:
        raise ValueError(f"pixels must be (H,W), (H,W,3) or (H,W,4) and non-empty; got {arr.shape}")
    scale = 255.0 if bits == 8 else 65535.0
    q = np.clip(np.nan_to_num(arr, nan=0.0) * scale + 0.5, 0, scale).astype(np.uint8 if bits == 8 else np.uint16)
    if q.ndim == 3:
        q = q[..., [2, 1, 0, 3]] if q.shape[-1] == 4 else q[..., ::-1]  # OpenCV writes BGR(A)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(q), [cv2.IMWRITE_PNG_COMPRESSION, int(compress_level)])
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an image of shape {arr.shape}")
    data = buf.tobytes()
    if text:
        ihdr_end = len(PNG_SIGNATURE) + 25  # signature + IHDR chunk (4 len + 4 type + 13 data + 4 crc)
        extra = b"".join(text_chunk(k, v) for k, v in text.items())
        data = data[:ihdr_end] + extra + data[ihdr_end:]
    return data


def read_png_text(data: bytes) -> dict[str, str]:
    """The tEXt/iTXt entries of PNG bytes (for tests and tools)."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    out, pos = {}, len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            k, _, v = body.partition(b"\0")
            out[k.decode("latin-1")] = v.decode("latin-1")
        elif kind == b"iTXt":
            k, _, rest = body.partition(b"\0")
            out[k.decode("latin-1")] = rest[2:].split(b"\0", 2)[-1].decode("utf-8")
        if kind == b"IEND":
            break
        pos += 12 + length
    return out
