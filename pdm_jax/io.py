"""Files users look at or reload: images, grids, PNG, .npz, JSON, and the one atomic writer.

Every file pdm_jax writes outside orbax goes through :func:`write_atomic`, locally and on
``gs://`` alike (etils.epath), so a reader (or a resumed run) never sees a half-written file.
Imports neither TensorFlow nor orbax: the inference API uses it too.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from typing import Any, Mapping

import numpy as np
from etils import epath
from PIL import Image

PathLike = str | os.PathLike


def write_atomic(path: PathLike, data: bytes | str) -> None:
    """Writes ``data`` to ``path`` through a temporary sibling renamed over it at the end.

    Local renames are atomic (POSIX); on object stores an object appears only once its upload
    completed, so neither leaves a torn file behind a crash. Parent directories are created.

    Args:
      path: local path or URL (``gs://...``).
      data: bytes, or text written as UTF-8.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer: two processes writing the same file never share a temporary.
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: PathLike, value: Any) -> None:
    """Writes ``value`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of ``np.savez(**arrays)``."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def save_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes ``arrays`` as one .npz, atomically."""
    write_atomic(path, npz_bytes(arrays))


def save_samples_npz(path: PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes ``arr_0`` uint8 NHWC images and ``arr_1`` labels (ADM's evaluator layout)."""
    save_npz(path, {"arr_0": images, "arr_1": labels})


#### Images ####


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Model samples in [-1, 1] -> uint8 as ADM's sample scripts and both official ports do:
    (x + 1) * 127.5, clipped to [0, 255], then TRUNCATED (not rounded), so that FIDs of our
    samples compare with theirs (rounding would shift every pixel by half a level on average)."""
    return np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)


def data_to_uint8(images: np.ndarray) -> np.ndarray:
    """Data images back to uint8: the exact inverse (by rounding) of the input pipeline's
    u / 127.5 - 1, for reference batches of the training data."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles uint8 NHWC images into one (rows*H, cols*W, C) image with white padding.

    Args:
      images: (N, H, W, C) uint8.
      columns: images per row; default ceil(sqrt(N)).
      pad: white pixels between and around the images.

    Returns:
      The grid, uint8 (rows * (H + pad) + pad, columns * (W + pad) + pad, C).
    """
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return grid


def png_bytes(image: np.ndarray, min_size: int = 512) -> bytes:
    """PNG encoding of a uint8 HWC image, upscaled (nearest) by the whole factor
    ``min_size // long side`` when that is above 1 (a grid of 32 px samples stays legible)."""
    scale = max(1, min_size // max(image.shape[:2]))
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: PathLike, image: np.ndarray, min_size: int = 512) -> None:
    """Writes a uint8 HWC image as PNG (see :func:`png_bytes`), atomically."""
    write_atomic(path, png_bytes(image, min_size))
