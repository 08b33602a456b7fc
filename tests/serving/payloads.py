"""Inputs the serving tests send: PNGs (valid and hand-broken), base64, digits drawn as on paper, and
the MNIST test split's shape."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
# The MNIST test split as the serving tests read it: (images [N,28,28], labels [N]).
Mnist = tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]
CHAMPION = "champion"
# An origin the main test server allows, to check CORS both ways.
ALLOWED_ORIGIN = "http://digits.example.test"


def png_bytes(array: npt.NDArray[Any], mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A 1-bit grayscale PNG written by hand, so headers can claim sizes PIL would refuse to create."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    if rows is None:
        compressor = zlib.compressobj(9)
        row = b"\x00" * (1 + (width + 7) // 8)
        data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:
        data = zlib.compress(rows)
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def on_paper(
    digit: npt.NDArray[np.uint8], scale: int = 10, canvas: int = 400, offset: tuple[int, int] = (60, 20)
) -> npt.NDArray[np.uint8]:
    """An MNIST digit as a person would draw it: big, black on white, off-centre."""
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    page = np.zeros((canvas, canvas), np.uint8)
    page[offset[0] : offset[0] + big.shape[0], offset[1] : offset[1] + big.shape[1]] = big
    return (255 - page).astype(np.uint8)
