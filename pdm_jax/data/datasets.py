"""Datasets by name: what a data section names, whether it can be read, its classes and size.

``data.name`` is the demo (``pdm_emoji_demo``, built offline on first use), any tfds image
dataset (``imagenet2012`` from ``data.manual_dir``, ``lsun/church_outdoor``, ...) or ``folder``
(``data.folder``). The checks here run in seconds before anything is built
(``config_validation.validate``), and ``--mode=prepare_data`` prepares a tfds dataset once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

# Importing the builder registers 'pdm_emoji_demo' with tfds, so tfds.builder() finds it.
from pdm_jax.data import emoji_demo
from pdm_jax.data.folders import class_dirs, scan_image_folder

DEMO_NAME = emoji_demo.PdmEmojiDemo.name  # "pdm_emoji_demo"
FOLDER_NAME = "folder"
# Files a manual-download tfds dataset needs in data.manual_dir before it can be prepared.
MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """The validated fields of a data config (see ``make_train_dataset``)."""

    name: str
    image_size: int
    folder: str | None = None
    data_dir: str | None = None
    manual_dir: str | None = None
    split: str = "train"
    shuffle_buffer: int = 10_000
    random_flip: bool = True
    class_conditional: bool = False
    cache: bool = False


def data_options(data_config: Any) -> DataOptions:
    """Reads a ConfigDict, a dict or any object with attributes into validated ``DataOptions``."""
    values = {}
    for field in dataclasses.fields(DataOptions):
        if isinstance(data_config, Mapping):
            present, value = field.name in data_config, data_config.get(field.name)
        else:
            present, value = hasattr(data_config, field.name), getattr(data_config, field.name, None)
        if present:
            # Config files spell "unset" as "" (ml-collections fields keep their type).
            values[field.name] = None if value == "" and field.default is None else value
        elif field.default is dataclasses.MISSING:
            raise ValueError(f"data config lacks the required field {field.name!r}.")
    opts = DataOptions(**values)
    if not isinstance(opts.name, str) or not opts.name:
        raise ValueError(f"data name must be a non-empty string, got {opts.name!r}.")
    if not isinstance(opts.image_size, (int, np.integer)) or opts.image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {opts.image_size!r}.")
    if int(opts.shuffle_buffer) < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {opts.shuffle_buffer!r}.")
    if opts.name == FOLDER_NAME and (not opts.folder or not os.path.isdir(opts.folder)):
        raise ValueError(f"data name 'folder' needs an existing directory, got folder="
                         f"{opts.folder!r}.")
    return opts


def refuse_to_prepare_on_every_process(opts: DataOptions,
                                        builder: tfds.core.DatasetBuilder) -> None:
    """Raises when several JAX processes would each prepare the (unprepared) dataset.

    Every process would download and prepare its own copy (ImageNet once per TPU worker, on
    its boot disk); only the demo, which renders in seconds, is built on first use there.
    """
    import jax  # the backend is up by now (validation counted the devices)

    if opts.name.split("/")[0].split(":")[0] == DEMO_NAME or jax.process_count() == 1:
        return
    manual = (" and data.manual_dir" if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
              else "")
    raise FileNotFoundError(
        f"Dataset {opts.name!r} is not prepared in {builder.data_dir}, and this run has "
        f"{jax.process_count()} processes, each of which would prepare it on its own. Prepare "
        f"it once first: python -m pdm_jax.main --mode=prepare_data (or launch/tpu.sh "
        f"prepare_data) with the same config and a data.data_dir every process reads (e.g. "
        f"--config.data.data_dir=gs://BUCKET/tensorflow_datasets{manual}), then train with "
        f"that data.data_dir.")


def download_and_prepare(opts: DataOptions, builder: tfds.core.DatasetBuilder) -> None:
    # The demo renders offline in seconds; other datasets download or read manual_dir here.
    logging.info("Preparing %s in %s.", opts.name, builder.data_dir)
    config = tfds.download.DownloadConfig(manual_dir=opts.manual_dir)
    builder.download_and_prepare(download_config=config)


def prepare(data_config: Any) -> str:
    """Prepares the data section's tfds dataset once (``--mode=prepare_data``).

    Args:
      data_config: the data config (see ``make_train_dataset``); a tfds name, with
        ``data_dir`` (where to write: a gs:// path every worker of a later run reads; None/""
        = TFDS_DATA_DIR or ~/tensorflow_datasets) and ``manual_dir`` if the dataset needs a
        manual download.

    Returns:
      The prepared dataset's directory (``builder.data_dir``).

    Raises:
      ValueError / FileNotFoundError: a folder dataset (nothing to prepare), an unknown name,
        or missing manual-download files.
    """
    opts = data_options(data_config)
    if opts.name == FOLDER_NAME:
        raise ValueError(f"data.name='folder' reads image files from data.folder="
                         f"{opts.folder!r} directly: there is nothing to prepare.")
    builder = _check_tfds_available(opts)
    if builder.is_prepared():
        logging.info("%s is prepared already in %s.", opts.name, builder.data_dir)
    else:
        download_and_prepare(opts, builder)
    return str(builder.data_dir)


def _check_tfds_available(opts: DataOptions) -> tfds.core.DatasetBuilder:
    builder = tfds_builder(opts)
    if builder.is_prepared():
        return builder
    refuse_to_prepare_on_every_process(opts, builder)
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        needed = MANUAL_FILES.get(opts.name.split("/")[0].split(":")[0], ())
        hint = (f"pass --config.data.manual_dir=DIR holding the manual download"
                f"{' (' + ', '.join(needed) + ')' if needed else ''}, or "
                f"--config.data.data_dir=DIR where it is prepared already")
        if not opts.manual_dir:
            raise FileNotFoundError(f"Dataset {opts.name!r} is not prepared in "
                                    f"{builder.data_dir} and needs a manual download: {hint}.")
        manual = epath.Path(opts.manual_dir)
        if not manual.is_dir():
            raise FileNotFoundError(f"data.manual_dir={opts.manual_dir!r} is not a directory; "
                                    f"{hint}.")
        missing = [name for name in needed if not (manual / name).exists()]
        if missing:
            raise FileNotFoundError(f"data.manual_dir={opts.manual_dir!r} lacks {missing} that "
                                    f"{opts.name!r} needs; {hint}.")
    return builder


def check_available(data_config: Any) -> int:
    """Checks, in seconds and before anything is built, that training can read the data.

    A folder must exist and hold decodable images; a tfds name must be known, and a dataset
    that is not prepared yet and needs a manual download must find its files in
    ``data.manual_dir``; a class-conditional run needs labels.

    Args:
      data_config: the data config (see ``make_train_dataset``).

    Returns:
      The number of classes (0 for an unconditional run).

    Raises:
      ValueError / FileNotFoundError: naming the value and what to pass instead.
    """
    opts = data_options(data_config)
    if opts.name == FOLDER_NAME:
        scan_image_folder(opts.folder)
    else:
        _check_tfds_available(opts)
    return num_classes(data_config)


def tfds_builder(opts: DataOptions) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(opts.name, data_dir=opts.data_dir)
    except Exception as e:  # DatasetNotFoundError, bad config names, ...
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"Unknown dataset name {opts.name!r} (neither 'folder' nor a tfds "
                         f"dataset): {first_line}") from e


def _label_names(opts: DataOptions) -> list[str] | None:
    if opts.name == FOLDER_NAME:
        return class_dirs(opts.folder) or None
    feature = tfds_builder(opts).info.features
    if "label" in feature and isinstance(feature["label"], tfds.features.ClassLabel):
        return list(feature["label"].names)
    return None


def class_names(data_config: Any) -> list[str]:
    """Class names in label order; empty when the run is not class-conditional.

    Args:
      data_config: the data config (see ``make_train_dataset``).

    Returns:
      ``num_classes(data_config)`` names.
    """
    opts = data_options(data_config)
    if not opts.class_conditional:
        return []
    names = _label_names(opts)
    if names is None:
        raise ValueError(f"class_conditional=True but dataset {opts.name!r} has no labels.")
    return names


def num_classes(data_config: Any) -> int:
    """Number of classes the labels index: 0 for unconditional runs (the U-Net's convention).

    Args:
      data_config: the data config (see ``make_train_dataset``).

    Returns:
      The class count; labels of class-conditional batches lie in [0, num_classes).
    """
    return len(class_names(data_config))


def dataset_size(data_config: Any) -> int:
    """Records in the data section's split (a tfds dataset must be prepared already)."""
    opts = data_options(data_config)
    if opts.name == FOLDER_NAME:
        return len(scan_image_folder(opts.folder).paths)
    return int(tfds_builder(opts).info.splits[opts.split].num_examples)
