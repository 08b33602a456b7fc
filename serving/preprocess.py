"""Turns client input into what the model was trained on: 28x28 float32 in [0,1], a white digit on
black, fitted into a 20x20 box and centred by mass, as the MNIST images were made.

Two paths:
- `from_pixels`: a 28x28 array is taken as already laid out like MNIST (only scaled, and inverted
  if it is dark-on-light). Pure numpy: this is the latency-critical path.
- `from_image_bytes`: an encoded image of any size and mode goes through the full MNIST recipe:
  decode, grayscale (alpha composited), invert dark-on-light, remove the background, crop to the
  digit, scale into 20x20, centre by mass in 28x28.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.errors import InvalidInputError, PayloadTooLargeError
from serving.model import IMAGE_SIDE, Float32Array

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
DIGIT_BOX = 20
MNIST_CENTRE = 14.0
# Large photos are shrunk to this before analysis: plenty for a 20-pixel digit, and bounded work.
WORK_SIDE = 384
# Below this contrast (0..255 scale) an image holds no digit.
MIN_CONTRAST = 16.0
SPECKLE_FRACTION = 0.2

_ring = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=bool)
_ring[:2, :] = _ring[-2:, :] = _ring[:, :2] = _ring[:, -2:] = True
# Flat indices of the 2-pixel frame of a 28x28 image: np.take on these is the cheapest border read.
_RING_INDEX = np.flatnonzero(_ring)
_RING_SIZE = float(_RING_INDEX.size)


def _dark_on_light(background: float, low: float, high: float) -> bool:
    """The background (border median) is nearer the bright end than the dark end: ink is dark."""
    return background > (low + high) / 2


def from_pixels(pixels: Float32Array) -> tuple[Float32Array, bool]:
    """A validated 28x28 array with values in [0,255] (or [0,1]) -> model input, and whether it was inverted.

    The hot path of `/predict`: a handful of numpy calls, no temporary beyond the scaled copy. The
    frame's mean stands in for the background (a median costs ten times more, and a 28x28 digit
    rarely touches the frame)."""
    high = float(pixels.max())
    if high > 1.0:
        pixels = pixels * np.float32(1 / 255)
        high /= 255
    low = float(pixels.min())
    background = float(np.take(pixels, _RING_INDEX).sum()) / _RING_SIZE
    if _dark_on_light(background, low, high):
        return np.float32(1.0) - pixels, True
    return pixels, False


def decode(data: bytes, *, max_pixels: int, budget: int | None = None) -> Image.Image:
    """Decode after checking the pixel count in the header: a small file may expand to gigabytes."""
    if not data:
        raise InvalidInputError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInputError("the data is not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLargeError(f"the image has too many pixels (limit {max_pixels})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"the image cannot be read: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"the image is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if budget is not None and width * height > budget:
        raise PayloadTooLargeError("the images in this request have too many pixels in total")
    if image.format == "JPEG":
        # Let libjpeg scale in the DCT domain: decoding a 12 MP photo at 1/8 size is ~30x cheaper.
        image.draft("L" if image.mode in ("L", "RGB") else image.mode, (WORK_SIDE, WORK_SIDE))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInputError(f"the image data is corrupt or truncated: {exc}") from None
    return image


def _grayscale(image: Image.Image) -> Float32Array:
    """Any PIL mode -> 2-D float32 on a 0..255 scale, shrunk to at most WORK_SIDE per side."""
    if image.format == "JPEG":
        image = ImageOps.exif_transpose(image)  # phone photos are stored sideways
    mode = image.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        image = image.convert("RGBA").convert("LA")
    elif mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if mode.startswith("I;16"):
            array = array / np.float32(257.0)
        else:
            high = float(array.max()) if array.size else 0.0
            if mode == "F" and high <= 1.0:
                array = array * np.float32(255.0)
            elif high > 255.0:
                array = array * np.float32(255.0 / high)
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    elif mode != "L":
        image = image.convert("L")
    if max(image.size) > WORK_SIDE:
        factor = -(-max(image.size) // WORK_SIDE)
        image = image.reduce(factor)
    array = np.asarray(image, dtype=np.float32)
    if not has_alpha:
        return array
    luminance, alpha = array[..., 0], array[..., 1] * np.float32(1 / 255)
    if bool((alpha >= 1.0).all()):
        return luminance
    # Transparent pixels have no colour of their own: put them on whichever background contrasts with
    # the ink (black strokes on a transparent canvas -> white paper; white strokes -> black).
    coverage = float(alpha.sum())
    ink = float((luminance * alpha).sum()) / coverage if coverage > 0 else 0.0
    background = np.float32(255.0 if ink < 128 else 0.0)
    composited: Float32Array = luminance * alpha + background * (np.float32(1.0) - alpha)
    return composited


def _border(gray: Float32Array) -> Float32Array:
    height, width = gray.shape
    ring = max(1, min(height, width) // 14)
    return np.concatenate(
        [
            gray[:ring].ravel(),
            gray[-ring:].ravel(),
            gray[ring:-ring, :ring].ravel(),
            gray[ring:-ring, -ring:].ravel(),
        ]
    )


def _mass_span(profile: Float32Array) -> npt.NDArray[np.intp]:
    cumulative = np.cumsum(profile, dtype=np.float64)
    total = cumulative[-1]
    first = int(np.searchsorted(cumulative, 0.005 * total))
    last = int(np.searchsorted(cumulative, 0.995 * total))
    return np.arange(first, last + 1)


def normalize_digit(gray: Float32Array) -> tuple[Float32Array, bool]:
    """2-D grayscale on a 0..255 scale -> MNIST-style 28x28 in [0,1], and whether it was inverted."""
    border = _border(gray)
    low, high = float(gray.min()), float(gray.max())
    inverted = _dark_on_light(float(np.median(border)), low, high)
    if inverted:
        gray = np.float32(255.0) - gray
        border = np.float32(255.0) - border
    floor = float(gray.min())
    if float(border.min()) == float(border.max()) == floor:
        # Clean input (MNIST, a canvas export): an exactly flat background. Nothing to remove, and
        # the crop is the exact bounding box, so an MNIST image comes out unchanged.
        gray = gray - np.float32(floor) if floor else gray
        peak = float(gray.max())
        if peak < MIN_CONTRAST:
            raise InvalidInputError("no digit found: the image is blank or has almost no contrast")
        gray = gray * np.float32(255.0 / peak)
        rows = np.flatnonzero(gray.max(axis=1) > 0)
        cols = np.flatnonzero(gray.max(axis=0) > 0)
    else:
        # A photo or a lossy file: paper, light and sensor noise leave a textured background. The
        # border gives its level and spread; what stays is faint speckle, cut at a fraction of the
        # ink's peak, and the crop keeps the rows/columns holding the central 99% of the ink.
        gray = gray - np.float32(np.percentile(border, 95))
        np.maximum(gray, 0, out=gray)
        peak = float(gray.max())
        if peak < MIN_CONTRAST:
            raise InvalidInputError("no digit found: the image is blank or has almost no contrast")
        gray[gray < np.float32(SPECKLE_FRACTION * peak)] = 0
        gray *= np.float32(255.0 / peak)
        rows = _mass_span(gray.sum(axis=1))
        cols = _mass_span(gray.sum(axis=0))
    crop = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape
    scale = DIGIT_BOX / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = Image.fromarray(np.ascontiguousarray(crop), mode="F").resize(
        (new_w, new_h), Image.Resampling.LANCZOS
    )
    patch = np.clip(np.asarray(resized, dtype=np.float32), 0, 255)
    total = float(patch.sum())
    if total <= 0:
        raise InvalidInputError("no digit found: the image is blank or has almost no contrast")
    # MNIST's centre of mass sits at pixel index (14, 14) (measured over the training set: 13.99, 14.00).
    cy = float((patch.sum(axis=1) * np.arange(new_h)).sum()) / total
    cx = float((patch.sum(axis=0) * np.arange(new_w)).sum()) / total
    top = min(max(round(MNIST_CENTRE - cy), 0), IMAGE_SIDE - new_h)
    left = min(max(round(MNIST_CENTRE - cx), 0), IMAGE_SIDE - new_w)
    out = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = patch * np.float32(1 / 255)
    return out, inverted


def from_image_bytes(
    data: bytes, *, max_pixels: int, budget: int | None = None
) -> tuple[Float32Array, bool, int]:
    """Encoded image -> (28x28 model input, inverted?, decoded pixel count)."""
    image = decode(data, max_pixels=max_pixels, budget=budget)
    pixels = image.size[0] * image.size[1]
    return *normalize_digit(_grayscale(image)), pixels
