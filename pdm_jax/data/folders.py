"""Image folders as datasets: class sub-folders give labels, every file is checked once.

A folder is scanned once per process (cached): every candidate file is opened with Pillow so
that corrupt, truncated or non-image files are skipped, counted and logged at start-up instead
of failing inside tf.data hours into a run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os

from absl import logging

# Container formats that both PIL (the start-up check) and tf.io.decode_image can read.
_TF_DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP"})


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """A scanned image folder: decodable files with labels, and the files that were skipped."""

    paths: list[str]
    labels: list[int]
    class_names: list[str] | None  # None: images directly in the folder, no labels.
    skipped: list[str]


def class_dirs(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _files_under(directory: str) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(parent, f) for f in sorted(files))
    return found


def _is_decodable_image(path: str) -> bool:
    """Whether ``path`` is a complete image in a format tf.io.decode_image reads."""
    from PIL import Image  # Only the folder source needs PIL.

    try:
        with Image.open(path) as image:
            if image.format not in _TF_DECODABLE_FORMATS:
                return False
            if image.format == "JPEG":
                # verify() does not read JPEG entropy data; a 1/8-scale draft decode does, cheaply,
                # so truncated files are caught here rather than inside a long run.
                image.draft("RGB", (1, 1))
                image.load()
            else:
                image.verify()  # PNG: every chunk CRC up to IEND.
        return True
    except Exception:  # noqa: BLE001 -- any failure to read means "not an image we can use".
        return False


@functools.lru_cache(maxsize=8)
def scan_image_folder(folder: str) -> ImageFolder:
    """Lists a folder's images, checking each one once so that bad files never reach tf.data.

    Class subfolders (any non-hidden subdirectory) give labels in SORTED folder-name order, the
    ImageNet convention (SPEC 7), and are searched recursively; files directly in ``folder`` are
    then ignored. Without subfolders the folder's own files form one unlabelled set. Corrupt,
    truncated and non-image files are skipped, counted and logged.

    Args:
      folder: the directory.

    Returns:
      The usable files in a deterministic (sorted) order, their labels, class names, skipped files.
    """
    classes = class_dirs(folder)
    if classes:
        candidates = [(p, label) for label, name in enumerate(classes)
                      for p in _files_under(os.path.join(folder, name))]
        if loose := [e.name for e in os.scandir(folder) if e.is_file()]:
            logging.warning("Ignoring %d files directly in %s (it has class subfolders).",
                            len(loose), folder)
    else:
        candidates = [(e.path, 0) for e in sorted(os.scandir(folder), key=lambda e: e.name)
                      if e.is_file()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4 * (os.cpu_count() or 1)) as pool:
        ok = list(pool.map(_is_decodable_image, [p for p, _ in candidates]))
    good = [c for c, keep in zip(candidates, ok) if keep]
    skipped = [p for (p, _), keep in zip(candidates, ok) if not keep]
    if skipped:
        logging.warning("Skipped %d of %d files in %s that are not decodable images, e.g. %s",
                        len(skipped), len(candidates), folder, skipped[:5])
    if not good:
        raise ValueError(f"No decodable images found in folder {folder!r}.")
    return ImageFolder(paths=[p for p, _ in good], labels=[y for _, y in good],
                       class_names=classes or None, skipped=skipped)
