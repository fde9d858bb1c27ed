"""Loading image references and turning them into model pixels, for training data and inference.

Model pixels are what transformers' Gemma3ImageProcessor (its Pillow backend, pan-and-scan off)
produces for T5Gemma 2, bit for bit:

    convert to RGB (transparency composited onto white, HF's convert_to_rgb) -> resize to
    image_size x image_size with Pillow BILINEAR -> uint8 [3, H, W] -> x * (1/255) in float64,
    cast to float32 -> (x - 0.5) / 0.5 in float32 -> float32 [3, H, W] in [-1, 1].

The last two steps depend only on the uint8 value, so they are one 256-entry table (`expand`).
Between parsing and batching an image is therefore held *compactly* as the resized uint8 array
(4x less memory than float32, no float work per image) and expanded only when a batch is
written; `preprocess_image` is the same two functions applied at once, so both routes agree.

An image reference is a `data:image/...;base64,...` URI, a file path (relative paths are resolved
against `base_dir`: the JSONL file's directory, or `data.image_root`), bare base64, raw encoded
bytes, a PIL image or a uint8 numpy array.

Error contract: every failure (missing or unreadable file, bad base64, corrupt or truncated data,
decompression bomb, zero size, unsupported mode) is one `ImageError(ValueError)` whose message
names the source and the reason, raised without a Pillow exception chained to it, and whose
`.reason` is the skip reason the data pipeline counts: `missing_image` when there is no file to
read, `corrupt_image` for everything else. Sizes are checked from the header before any pixel is
decoded, so a decompression bomb costs nothing but its header.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from typing import Sequence, Union

import numpy as np
from PIL import Image

from t5gemma2_jax import storage

IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
RESCALE_FACTOR = 1.0 / 255.0
# Pillow's own decompression-bomb threshold (~89.5 MP); larger images are refused before decoding.
DEFAULT_MAX_PIXELS = 89_478_485
# Longer strings are never treated as paths (no filesystem lookup for a multi-MB base64 blob).
_MAX_PATH_LEN = 4096

MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
REASONS = (MISSING_IMAGE, CORRUPT_IMAGE)

ImageSource = Union[str, bytes, bytearray, memoryview, os.PathLike, Image.Image, np.ndarray]

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")


class ImageError(ValueError):
    """Carries the skip reason so that the pipeline can count a bad image instead of dying on
    it, and is a ValueError so that callers outside the pipeline can treat it as bad input."""

    def __init__(self, message: str, reason: str = CORRUPT_IMAGE):
        if reason not in REASONS:
            raise ValueError(f"ImageError reason must be one of {REASONS}, got {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # the default would rebuild it from the message alone, losing the reason
        return type(self), (str(self), self.reason)


# ------------------------------------------------------------------------------------------------
# Reading references
# ------------------------------------------------------------------------------------------------


def _describe(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        # Paths are named whole; what is longer (base64 data inline) is cut to its start, which says
        # its kind, and its end.
        return repr(s if len(s) <= 240 else s[:60] + "..." + s[-60:])
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def _b64(s: str, origin: str) -> bytes:
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"image {origin} is not valid base64: {e}") from None


def _looks_like_base64(s: str) -> bool:
    # Paths are short and usually carry a '.', which base64 never has; a real encoded image is
    # long. Short strings are treated as (missing) paths for a clearer message.
    return len(s) >= 64 and "." not in s and _BASE64_RE.match(s) is not None


def _read_file(path: str, origin: str) -> bytes:
    try:
        if storage.is_url(path):
            return storage.read_bytes(path)
        with open(path, "rb") as f:
            return f.read()
    except storage.StorageError:
        raise                         # the store failing is not a bad image
    except IsADirectoryError:
        raise ImageError(f"image path {origin} is a directory", MISSING_IMAGE) from None
    except OSError as e:
        raise ImageError(f"image file {origin} could not be read: {e.strerror or e}",
                         MISSING_IMAGE) from None


def _resolve(ref: str, base_dir: str | os.PathLike | None) -> str:
    if base_dir is None or os.path.isabs(ref) or storage.is_url(ref):
        return ref
    if storage.is_url(base_dir):
        return os.fspath(base_dir).rstrip("/") + "/" + ref
    return os.path.join(os.fspath(base_dir), ref)


def _exists(path: str) -> bool:
    if storage.is_url(path):
        with storage.storage_op("reading", path):
            return storage.as_path(path).is_file()
    return os.path.exists(path)


def _load_string(ref: str, base_dir, max_pixels: int | None) -> Image.Image:
    origin = _describe(ref)
    if not ref:
        raise ImageError("image reference is an empty string")
    if ref[:5].lower() == "data:":
        header, _, payload = ref.partition(",")
        if not header.lower().endswith(";base64"):
            raise ImageError(f"image {origin}: data: URI images must be base64-encoded")
        return _decode(_b64(payload, origin), f"{origin} (base64 data URI)", max_pixels)
    path = None
    if len(ref) < _MAX_PATH_LEN and "\n" not in ref:
        path = _resolve(ref, base_dir)
        if _exists(path):
            where = _describe(path)
            return _decode(_read_file(path, where), where, max_pixels)
    where = _describe(path) if path is not None else origin
    if _looks_like_base64(ref):
        try:
            data = _b64(ref, origin)
        except ImageError as e:
            # Neither reading worked; nothing here was image data, so the likeliest intent is a
            # file that is not there.
            raise ImageError(f"image {where} is not an existing file, and as base64 data: {e}",
                             MISSING_IMAGE) from None
        try:
            return _decode(data, f"{origin} (base64)", max_pixels)
        except ImageError as e:
            raise ImageError(f"image {where} is not an existing file, and as base64 data: {e}",
                             e.reason) from None
    raise ImageError(f"image file {where} does not exist (and the string is not base64 image data)",
                     MISSING_IMAGE)


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------


def _check_size(img: Image.Image, origin: str, max_pixels: int | None) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image {origin} has zero size ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"image {origin} is too large: {w}x{h} = {w * h} pixels > max_pixels={max_pixels} "
            "(refused as a possible decompression bomb; pass a larger max_pixels to allow it)"
        )


def _decode(data: bytes, origin: str, max_pixels: int | None) -> Image.Image:
    if len(data) == 0:
        raise ImageError(f"image {origin} is empty (0 bytes)")
    # Pillow only *warns* between 1x and 2x its bomb limit; that is an error here unless the
    # caller explicitly allowed more pixels than Pillow's limit.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    lenient = max_pixels is None or (pillow_limit is not None and max_pixels > pillow_limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if lenient else "error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            # The header gives the size without decoding pixels: refuse bombs before load().
            _check_size(img, origin, max_pixels)
            img.load()  # Image.open is lazy; truncation and corrupt pixel data show up here.
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {origin} refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"image {origin} is not in a format Pillow can identify "
                         "(corrupt or not an image)") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on bad data.
        raise ImageError(f"image {origin} could not be decoded (corrupt or truncated): "
                         f"{type(e).__name__}: {e}") from None
    return img


def _from_array(a: np.ndarray, max_pixels: int | None) -> Image.Image:
    origin = f"<ndarray {a.dtype} {a.shape}>"
    if a.dtype != np.uint8:
        raise ImageError(f"image {origin}: numpy images must be uint8 in [0, 255]")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageError(f"image {origin}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] "
                         "(channels last)")
    img = Image.fromarray(np.ascontiguousarray(a))
    _check_size(img, origin, max_pixels)
    return img


def load_image(src: ImageSource, *, base_dir: str | os.PathLike | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load and fully decode one image, so that truncated data fails here and not later.

    The image keeps its original mode: conversion to RGB belongs to preprocessing, as in Hugging
    Face. Relative paths are resolved against `base_dir`. Raises `ImageError` (see the module
    docstring); `max_pixels=None` lifts the size limit up to Pillow's own bomb check.
    """
    if isinstance(src, Image.Image):
        origin = _describe(src)
        _check_size(src, origin, max_pixels)
        try:
            src.load()
        except Exception as e:
            raise ImageError(f"image {origin} could not be decoded: {type(e).__name__}: {e}") from None
        return src
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(bytes(src), _describe(src), max_pixels)
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if isinstance(src, str):
        return _load_string(src, base_dir, max_pixels)
    raise ImageError(f"cannot load an image from {_describe(src)}; expected a path, bytes, a base64 "
                     "string, a PIL image or a uint8 numpy array")


# ------------------------------------------------------------------------------------------------
# Model pixels
# ------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' `convert_to_rgb` does it, because a plain `convert("RGB")` would
    turn transparent areas black: anything with an alpha band or a `transparency` entry is
    alpha-composited onto opaque white; everything else goes through `convert("RGB")`."""
    if image.mode == "RGB":
        return image
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# uint8 value -> model pixel value, with HF's arithmetic (rescale in float64, cast to float32,
# normalise in float32), so that a table lookup is bit-identical to computing it per pixel.
_PIXEL_OF_BYTE = ((np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
                  - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)


def expand(images: np.ndarray) -> np.ndarray:
    """Compact uint8 images (any shape) -> float32 model pixels; float32 passes through."""
    if images.dtype == np.uint8:
        return _PIXEL_OF_BYTE[images]
    return images.astype(np.float32, copy=False)


def compact(pixels: np.ndarray) -> np.ndarray:
    """float32 model pixels -> the uint8 they came from, if `expand` restores them exactly
    (else the float32 array unchanged, so nothing is ever rounded)."""
    u = np.clip(np.rint((pixels + np.float32(1.0)) * np.float32(127.5)), 0, 255).astype(np.uint8)
    return u if np.array_equal(_PIXEL_OF_BYTE[u], pixels) else pixels


def concat(arrays: list[np.ndarray], image_size: int) -> np.ndarray:
    """Concatenates image stacks that may mix compact and float32 storage."""
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        return np.zeros((0, 3, image_size, image_size), np.uint8)
    if len({a.dtype for a in arrays}) > 1:
        arrays = [expand(a) for a in arrays]
    return np.concatenate(arrays)


def _check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def to_pixels(image: ImageSource, image_size: int) -> np.ndarray:
    """The compact form of an image: uint8 [3, image_size, image_size] after RGB conversion and
    Pillow bilinear resize; `expand` of it is the model pixels.

    `image` may be anything `load_image` accepts; non-PIL inputs are loaded with its defaults.
    """
    size = _check_image_size(image_size)
    img = load_image(image)
    try:
        rgb = to_rgb(img)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), resample=Image.Resampling.BILINEAR)
        x = np.asarray(rgb, dtype=np.uint8)
    except Exception as e:  # e.g. truncated data or a mode Pillow cannot convert
        raise ImageError(f"image {_describe(image)} (mode {img.mode!r}) could not be converted to "
                         f"RGB and resized: {type(e).__name__}: {e}") from None
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # HWC -> CHW (the HF / PyTorch layout)


def preprocess_image(image: ImageSource, image_size: int) -> np.ndarray:
    """One image -> float32 pixels `[3, image_size, image_size]` in [-1, 1], bit-identical to
    `Gemma3ImageProcessor(size={'height': s, 'width': s})` with pan-and-scan off."""
    return expand(to_pixels(image, image_size))


def preprocess_images(images: Sequence[ImageSource], image_size: int) -> np.ndarray:
    """Several images -> `[N, 3, image_size, image_size]` float32 (N may be 0)."""
    if len(images) == 0:
        return np.zeros((0, 3, image_size, image_size), np.float32)
    return np.stack([preprocess_image(im, image_size) for im in images])


def load_pixels(ref: ImageSource, base_dir: str | os.PathLike | None, image_size: int, *,
                compact_ok: bool = False) -> np.ndarray:
    """Reference -> model pixels: float32, or the compact uint8 when the caller can hold it
    (`compact_ok`) and expand it later. Raises `ImageError`."""
    _check_image_size(image_size)
    pixels = to_pixels(load_image(ref, base_dir=base_dir), image_size)
    return pixels if compact_ok else expand(pixels)
