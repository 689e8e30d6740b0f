"""Image helpers without TensorFlow: [-1, 1] floats -> uint8, grids, PNG encoding.

Shared by training (metrics.py writes through tf.io.gfile for gs:// paths) and the standalone
inference API (inference.py, sample_export.py), which must not import TensorFlow.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 with round-to-nearest (ADM's convention)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles uint8 NHWC images into one (rows*H, cols*W, C) image with white padding."""
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return grid


def png_bytes(image: np.ndarray, min_size: int = 256) -> bytes:
    """PNG encoding of a uint8 HWC image, upscaled (nearest) so its long side is >= min_size."""
    scale = max(1, min_size // max(image.shape[:2]))
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def write_file_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to a local ``path`` through a temporary file renamed at the end."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save_png_local(path: str, image: np.ndarray, min_size: int = 256) -> None:
    """Writes a uint8 HWC image as PNG to a local path, atomically (see png_bytes)."""
    write_file_atomic(path, png_bytes(image, min_size))
