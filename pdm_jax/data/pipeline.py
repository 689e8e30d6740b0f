"""Training input pipeline: tfds / image folder -> per-process, seeded, resumable tf.data batches.

One pipeline for every dataset (SPEC 7, 10): the OpenMoji demo ('pdm_emoji_demo', built on first
use), any tfds image dataset ('imagenet2012', 'lsun/church_outdoor', ...) or a folder ('folder').
Each process reads its own part of the data; images are centre-cropped, box-downsampled then
bicubic-resized, randomly flipped and scaled to [-1, 1].

Resumption: a process's stream is epoch 0, 1, ..., epoch e being its records shuffled with a seed
derived from (seed, process_index, e); the flip of element i is a stateless function of (seed,
process_index, i). So ``start_example = k * local_batch`` yields exactly batches k, k+1, ... of
the stream from 0: it starts at epoch ``start_example // n`` and skips ``start_example % n``
ENCODED records (bytes or paths, nothing decoded): at most one epoch of reading, never the history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from pdm_jax.data import datasets
from pdm_jax.data.datasets import FOLDER_NAME, DataOptions, data_options
from pdm_jax.data.folders import scan_image_folder

def hide_accelerators_from_tensorflow() -> None:
    """Keeps TensorFlow (tf.data) off the accelerators, whose memory belongs to JAX.

    Call it before anything initialises TensorFlow's devices (main does, first thing).

    Raises:
      RuntimeError: TensorFlow already initialised accelerators it can see: it would hold
        accelerator memory (say so rather than fail later with an out-of-memory error).
    """
    for kind in ("GPU", "TPU"):
        if not tf.config.list_physical_devices(kind):
            continue
        try:
            tf.config.set_visible_devices([], kind)
        except RuntimeError as e:
            raise RuntimeError(f"TensorFlow initialised its {kind}s before pdm_jax could hide "
                               f"them from tf.data; import pdm_jax.main (or call this) before "
                               f"using TensorFlow.") from e


#### Sources: per-process (payload, label) records; payload = encoded bytes or a path ####


@dataclasses.dataclass(frozen=True)
class _Source:
    """One process's records: (tf.string payload, tf.int32 label), finite, in a fixed order."""

    records: tf.data.Dataset
    num_records: int
    payload_is_path: bool


def _tfds_source(opts: DataOptions, process_index: int, process_count: int) -> _Source:
    builder = datasets.tfds_builder(opts)
    if not builder.is_prepared():
        datasets.refuse_to_prepare_on_every_process(opts, builder)
        datasets.download_and_prepare(opts, builder)
    split = opts.split
    if process_count > 1:
        # Each process reads only its own files; equal sizes so every process has equal epochs.
        split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    ds = builder.as_dataset(
        split=split, shuffle_files=False,  # Order must be a pure function of the data.
        decoders={"image": tfds.decode.SkipDecoding()},  # Shuffle and skip encoded bytes.
        read_config=tfds.ReadConfig(try_autocache=False))
    has_label = "label" in builder.info.features
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"] if has_label else 0, tf.int32)))
    n = int(ds.cardinality())  # tfds asserts it; count the encoded records if not.
    n = n if n >= 0 else int(ds.reduce(np.int64(0), lambda c, _: c + 1))
    return _Source(ds, n, payload_is_path=False)


def _folder_source(opts: DataOptions, process_index: int, process_count: int) -> _Source:
    scan = scan_image_folder(opts.folder)
    # Stride over the sorted list so each process sees every class; drop the remainder so every
    # process has the same epoch length.
    usable = len(scan.paths) // process_count * process_count
    paths = scan.paths[process_index:usable:process_count]
    labels = scan.labels[process_index:usable:process_count]
    if not paths:
        raise ValueError(f"Folder {opts.folder!r} has {len(scan.paths)} images, fewer than "
                         f"process_count={process_count}.")
    ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int32)))
    return _Source(ds, len(paths), payload_is_path=True)


#### Preprocessing (SPEC 7) ####


def center_crop_and_resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Centre square crop, box downsampling by powers of 2, then bicubic resize to image_size.

    Follows guided-diffusion's ``center_crop_arr`` (repeated BOX halving while the short side is
    >= 2 * image_size, then BICUBIC) in TF ops. The k halvings are done as one exact area resize
    by 2**k of a crop whose side is a multiple of 2**k; upsampling (side < image_size) is plain
    bicubic.

    Args:
      image: uint8 (H, W, C) image.
      image_size: output side.

    Returns:
      uint8 (image_size, image_size, C).
    """
    image = tf.convert_to_tensor(image)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(h, w)
    reduced, _ = tf.while_loop(lambda s, k: s >= 2 * image_size, lambda s, k: (s // 2, k + 1),
                               (side, tf.constant(0)))
    crop = reduced * (side // reduced)  # == reduced * 2**k, <= side.
    top, left = (h - crop) // 2, (w - crop) // 2
    x = tf.cast(image[top:top + crop, left:left + crop], tf.float32)
    x = tf.image.resize(x, [reduced, reduced], method="area")  # Exact 2**k x 2**k block means.
    # antialias widens the kernel when downscaling, as PIL's BICUBIC does; no effect upscaling.
    x = tf.image.resize(x, [image_size, image_size], method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _decode(payload: tf.Tensor, image_size: int, payload_is_path: bool) -> tf.Tensor:
    data = tf.io.read_file(payload) if payload_is_path else payload
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return center_crop_and_resize(image, image_size)  # Static shape (size, size, 3).


def _mix(*values: int) -> int:
    """A 31-bit seed from integers (splitmix64 steps), so derived seeds do not collide trivially."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 33


def make_train_dataset(data_config: Any, *, global_batch_size: int, seed: int,
                       process_index: int, process_count: int,
                       start_example: int = 0) -> tf.data.Dataset:
    """The infinite, per-process, deterministic and resumable training stream.

    Args:
      data_config: ConfigDict, dict or attribute object with fields name ('pdm_emoji_demo[/res128]'
        | a tfds name | 'folder'), image_size, and optionally folder, data_dir (tfds data dir,
        None = tfds default), manual_dir, split ('train'), shuffle_buffer (10000; 0/1 = no
        shuffle), random_flip (True), class_conditional (False: every label is 0), cache (False;
        True keeps decoded, resized uint8 images in memory -- for small datasets).
      global_batch_size: examples per step over all processes.
      seed: shuffling and flip seed; equal arguments give bitwise-equal batches.
      process_index: this process, in [0, process_count).
      process_count: number of processes; each reads a disjoint part of the data.
      start_example: examples this process already consumed (step * local batch), to resume.

    Returns:
      A dataset of {'image': float32 (B, S, S, 3) in [-1, 1], 'label': int32 (B,), 'index':
      int64 (B,)} with B = global_batch_size // process_count; 'index' is each example's
      position in this process's record stream, so ``index[-1] + 1`` is where a resumed stream
      must start (:func:`records_consumed`), even after records that failed to decode were
      dropped.
    """
    opts = data_options(data_config)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count="
                         f"{process_count}).")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}.")
    if start_example < 0:
        raise ValueError(f"start_example must be >= 0, got {start_example}.")
    if opts.class_conditional:
        datasets.class_names(data_config)  # Raises if the dataset has no labels to condition on.
    local_batch = global_batch_size // process_count
    size = int(opts.image_size)

    if opts.name == FOLDER_NAME:
        source = _folder_source(opts, process_index, process_count)
    else:
        source = _tfds_source(opts, process_index, process_count)
    records = source.records
    if not opts.class_conditional:
        records = records.map(lambda payload, label: (payload, tf.zeros_like(label)))

    if opts.cache:  # Decode once; later epochs shuffle and skip cached uint8 images instead.
        # No ignore_errors here: a dropped record would change the epoch length the resume
        # offset is computed with. A record that fails to decode stops the run, naming it.
        records = records.map(lambda p, y: (_decode(p, size, source.payload_is_path), y),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()

    n = source.num_records
    first_epoch, offset = divmod(start_example, n)
    buffer = min(int(opts.shuffle_buffer), n)
    shuffle_seed = _mix(seed, process_index, 0)
    flip_key = tf.constant(_mix(seed, process_index, 1), tf.int64)

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        if buffer <= 1:
            return records
        # A fresh seed per epoch, a function of the epoch number only (not of history).
        return records.shuffle(buffer, seed=shuffle_seed + 1_000_003 * e,
                               reshuffle_each_iteration=False)

    ds = tf.data.Dataset.counter(start=first_epoch).flat_map(epoch).skip(offset)
    ds = ds.enumerate(start=start_example)  # Index i of each element in this process's stream.

    def finish(i, record):
        payload, label = record
        image = payload if opts.cache else _decode(payload, size, source.payload_is_path)
        if opts.random_flip:
            u = tf.random.stateless_uniform([], seed=tf.stack([flip_key, i]))
            image = tf.cond(u < 0.5, lambda: tf.reverse(image, axis=[1]), lambda: image)
        return {"image": tf.cast(image, tf.float32) / 127.5 - 1.0, "label": label, "index": i}

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not opts.cache:
        # Last line of defence (folder files were checked at start-up): a record that still fails
        # to decode is dropped and logged by tf.data instead of ending the run. The 'index' of
        # the batches counts it, so the resume position stays exact.
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def iterate_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a dataset as numpy dicts.

    Args:
      ds: e.g. the result of ``make_train_dataset``.

    Returns:
      A python iterator of dicts of numpy arrays.
    """
    return iter(tfds.as_numpy(ds))


def records_consumed(batch: Mapping[str, np.ndarray]) -> int:
    """The ``start_example`` that resumes a stream right after ``batch`` (its last index + 1)."""
    return int(batch["index"][-1]) + 1
