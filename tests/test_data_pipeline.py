"""Input pipeline (SPEC 7, 10): sources, preprocessing, per-process split, determinism, resume,
stream positions that survive dropped records, availability checks."""

import hashlib
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pdm_jax.data import datasets, emoji_demo, folders, pipeline


def _take(ds, n):
    it = pipeline.iterate_numpy(ds)
    return [next(it) for _ in range(n)]


def _digests(batches):
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest()
            for b in batches for im in b["image"]]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A tfds data dir holding the full default demo set (res64), built by first use."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    assert not tfds.builder("pdm_emoji_demo", data_dir=data_dir).is_prepared()
    config = dict(name="pdm_emoji_demo", image_size=64, data_dir=data_dir)
    _take(pipeline.make_train_dataset(config, global_batch_size=2, seed=0, process_index=0,
                                      process_count=1), 1)
    assert tfds.builder("pdm_emoji_demo", data_dir=data_dir).is_prepared()
    return data_dir


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    """13 distinct, left-right asymmetric 8x8 RGB noise PNGs directly in one folder (unlabelled)."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for i in range(13):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return str(root)


def _noise_config(folder, **overrides):
    return dict(dict(name="folder", folder=folder, image_size=8, shuffle_buffer=100,
                     random_flip=True, class_conditional=False, cache=False), **overrides)


def _adm_center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's PIL reference: BOX halving while short side >= 2*size, BICUBIC, crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


# ---------------------------------------------------------------------------------------------
# (a) tfds datasets through mock_data.


def test_mock_imagenet_batches_have_shape_dtype_range_and_sorted_synset_labels():
    config = dict(name="imagenet2012", image_size=16, data_dir="/nonexistent/tfds",
                  shuffle_buffer=8, random_flip=True, class_conditional=True)
    with tfds.testing.mock_data(num_examples=12):
        batches = _take(pipeline.make_train_dataset(
            config, global_batch_size=8, seed=0, process_index=0, process_count=1), 3)
        names = datasets.class_names(config)
    for k, b in enumerate(batches):
        assert b.keys() == {"image", "label", "index"}
        assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (8,) and b["label"].dtype == np.int32
        assert b["index"].dtype == np.int64
        np.testing.assert_array_equal(b["index"], np.arange(8 * k, 8 * k + 8))
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["image"].std() > 0.1  # Mock images are noise, not a constant fill.
        assert ((0 <= b["label"]) & (b["label"] < 1000)).all()
    assert datasets.num_classes(config) == 1000
    assert names[0] == "n01440764" and names == sorted(names)  # SPEC 7: sorted synset ids.


def test_mock_lsun_is_unconditional_with_zero_labels():
    config = dict(name="lsun/church_outdoor", image_size=12, data_dir="/nonexistent/tfds")
    with tfds.testing.mock_data(num_examples=6):
        (b,) = _take(pipeline.make_train_dataset(
            config, global_batch_size=4, seed=1, process_index=0, process_count=1), 1)
    assert b["image"].shape == (4, 12, 12, 3) and (b["label"] == 0).all()
    assert datasets.num_classes(config) == 0 and datasets.class_names(config) == []
    with pytest.raises(ValueError, match="lsun/church_outdoor"):
        datasets.num_classes(dict(config, class_conditional=True))


# ---------------------------------------------------------------------------------------------
# (b) Image folders: sorted class folders, bad files skipped and counted.


def test_image_folder_skips_bad_files_and_labels_by_sorted_folder_name(tmp_path, caplog):
    # Class 'a_red' sorts first although it is created second; sizes and formats differ.
    (tmp_path / "b_blue").mkdir()
    (tmp_path / "a_red").mkdir()
    for i, (h, w) in enumerate([(40, 30), (17, 50), (64, 64)]):
        Image.new("RGB", (w, h), (20, 30, 230)).save(tmp_path / "b_blue" / f"{i}.jpg", quality=95)
        Image.new("RGB", (h, w), (230, 20, 30)).save(tmp_path / "a_red" / f"{i}.png")
    (tmp_path / "a_red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    jpeg = (tmp_path / "b_blue" / "0.jpg").read_bytes()
    (tmp_path / "b_blue" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "b_blue" / "notes.txt").write_text("not an image")

    with caplog.at_level(logging.WARNING):
        scan = folders.scan_image_folder(str(tmp_path))
    assert scan.class_names == ["a_red", "b_blue"]
    assert sorted(os.path.basename(p) for p in scan.skipped) == [
        "broken.png", "notes.txt", "truncated.jpg"]
    assert len(scan.paths) == 6 and scan.labels == [0, 0, 0, 1, 1, 1]
    assert "Skipped 3 of 9 files" in caplog.text

    config = dict(name="folder", folder=str(tmp_path), image_size=16, shuffle_buffer=10,
                  random_flip=True, class_conditional=True)
    assert datasets.class_names(config) == ["a_red", "b_blue"]
    assert datasets.check_available(config) == 2 and datasets.dataset_size(config) == 6
    assert datasets.check_available(dict(config, class_conditional=False)) == 0
    batches = _take(pipeline.make_train_dataset(
        config, global_batch_size=6, seed=0, process_index=0, process_count=1), 4)
    for b in batches:
        assert b["image"].shape == (6, 16, 16, 3) and b["label"].dtype == np.int32
        red = b["image"][..., 0].mean(axis=(1, 2)) > b["image"][..., 2].mean(axis=(1, 2))
        np.testing.assert_array_equal(red, b["label"] == 0)
        assert sorted(b["label"].tolist()) == [0, 0, 0, 1, 1, 1]  # One epoch per batch.


# ---------------------------------------------------------------------------------------------
# (c) Determinism and resumption, (d) per-process split.


def test_same_arguments_give_identical_batches_and_seeds_change_order(noise_folder):
    config = _noise_config(noise_folder)
    kwargs = dict(global_batch_size=4, process_index=0, process_count=1)
    a = _take(pipeline.make_train_dataset(config, seed=7, **kwargs), 6)
    b = _take(pipeline.make_train_dataset(config, seed=7, **kwargs), 6)
    c = _take(pipeline.make_train_dataset(config, seed=8, **kwargs), 6)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
    # 24 examples span epochs 0 and 1 (13 images): each epoch visits every image, reordered.
    unflipped = _take(pipeline.make_train_dataset(
        _noise_config(noise_folder, random_flip=False), seed=7, **kwargs), 6)
    order = _digests(unflipped)
    assert len(set(order[:13])) == 13 and set(order[13:24]) <= set(order[:13])
    assert order[13:24] != order[:11]


@pytest.mark.parametrize("cache", [False, True])
def test_resume_from_start_example_is_bitwise_equal(noise_folder, cache):
    config = _noise_config(noise_folder, cache=cache)
    kwargs = dict(global_batch_size=4, seed=3, process_index=0, process_count=1)
    full = _take(pipeline.make_train_dataset(config, **kwargs), 12)  # 48 examples, ~4 epochs.
    for k, batch in enumerate(full):  # 'index': each example's position in the stream
        np.testing.assert_array_equal(batch["index"], np.arange(4 * k, 4 * k + 4))
    for k in (1, 5, 9):  # Resume inside epoch 0, across into epoch 1, and in epoch 2.
        start = pipeline.records_consumed(full[k - 1])
        assert start == 4 * k
        resumed = _take(pipeline.make_train_dataset(config, start_example=start, **kwargs), 3)
        for j, batch in enumerate(resumed):
            np.testing.assert_array_equal(batch["image"], full[k + j]["image"])
            np.testing.assert_array_equal(batch["label"], full[k + j]["label"])
            np.testing.assert_array_equal(batch["index"], full[k + j]["index"])
    # The flip really happens: some element differs from its unflipped twin.
    plain = _take(pipeline.make_train_dataset(dict(config, random_flip=False), **kwargs), 12)
    flipped = [np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
               for fb, pb in zip(full, plain) for f, p in zip(fb["image"], pb["image"])]
    assert 0.2 < np.mean(flipped) < 0.8


def test_a_record_that_fails_to_decode_is_dropped_and_the_resume_position_counts_it(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    config = _noise_config(str(tmp_path), shuffle_buffer=0, random_flip=False)
    kwargs = dict(global_batch_size=4, seed=0, process_index=0, process_count=1)
    intact = _take(pipeline.make_train_dataset(config, **kwargs), 4)  # scans the folder once
    # The file breaks after the start-up scan (this process keeps the scan's file list).
    (tmp_path / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    broken = _take(pipeline.make_train_dataset(config, **kwargs), 3)
    # Stream positions 3 and 11 (record 3 in epochs 0 and 1) are dropped, not decoded.
    assert [b["index"].tolist() for b in broken] == [[0, 1, 2, 4], [5, 6, 7, 8], [9, 10, 12, 13]]
    flat = {int(i): im for b in intact for i, im in zip(b["index"], b["image"])}
    for b in broken:
        for i, im in zip(b["index"], b["image"]):
            np.testing.assert_array_equal(im, flat[int(i)])
    # Resuming at records_consumed() continues exactly where the stream was.
    start = pipeline.records_consumed(broken[0])
    assert start == 5
    (resumed,) = _take(pipeline.make_train_dataset(config, start_example=start, **kwargs), 1)
    np.testing.assert_array_equal(resumed["index"], [5, 6, 7, 8])
    np.testing.assert_array_equal(resumed["image"], broken[1]["image"])


def test_demo_processes_read_disjoint_halves(demo_dir):
    config = dict(name="pdm_emoji_demo", image_size=64, data_dir=demo_dir, shuffle_buffer=0,
                  random_flip=False, class_conditional=True)
    n = tfds.builder("pdm_emoji_demo", data_dir=demo_dir).info.splits["train"].num_examples
    per_process = n // 2
    seen = []
    for index in (0, 1):
        ds = pipeline.make_train_dataset(config, global_batch_size=2 * 32, seed=0,
                                         process_index=index, process_count=2)
        batches = _take(ds, per_process // 32)
        seen.append(set(_digests(batches)))
        assert len(seen[-1]) == per_process // 32 * 32  # Demo images are all distinct.
    assert not seen[0] & seen[1]
    with pytest.raises(ValueError, match="process_index=2"):
        pipeline.make_train_dataset(config, global_batch_size=4, seed=0, process_index=2,
                                    process_count=2)


# ---------------------------------------------------------------------------------------------
# (e) Preprocessing.


def test_center_crop_keeps_the_centre_of_non_square_images():
    wide = np.zeros((30, 90, 3), np.uint8)
    wide[:, :30], wide[:, 30:60], wide[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = pipeline.center_crop_and_resize(wide, 10).numpy()
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out, np.broadcast_to([0, 255, 0], out.shape))
    # Tall image with a 10-pixel black border around a white centre: the crop drops the top and
    # bottom bands, so only the left/right border survives (box path: 120 -> 60 -> 30 -> resize).
    tall = np.zeros((240, 120, 3), np.uint8)
    tall[10:-10, 10:-10] = 255
    out = pipeline.center_crop_and_resize(tall, 24).numpy().astype(int)
    assert out[:, 12].min() == 255 and out[12, :].min() < 20  # Rows full white, sides dark.


@pytest.mark.parametrize("shape,size", [((100, 300, 3), 32), ((8, 8, 3), 32), ((5, 7, 3), 64)])
def test_resizing_a_constant_image_stays_constant(shape, size):
    out = pipeline.center_crop_and_resize(np.full(shape, 173, np.uint8), size).numpy()
    assert out.shape == (size, size, 3) and (out == 173).all()


@pytest.mark.parametrize("side,size", [(256, 64), (200, 48), (40, 64)])
def test_resize_matches_guided_diffusion_center_crop_arr(side, size):
    yy, xx = np.mgrid[0:side, 0:side]
    smooth = np.stack([127 + 100 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    smooth = smooth.astype(np.uint8)
    ours = pipeline.center_crop_and_resize(smooth, size).numpy().astype(int)
    reference = _adm_center_crop_arr(Image.fromarray(smooth), size).astype(int)
    assert np.abs(ours - reference).mean() < 1.0 and np.abs(ours - reference).max() <= 3


def test_native_size_is_passed_through_unchanged():
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pipeline.center_crop_and_resize(x, 32).numpy(), x)


# ---------------------------------------------------------------------------------------------
# (f) The demo dataset.


def test_demo_builder_renders_all_distinct_colourful_emoji(demo_dir):
    builder = tfds.builder("pdm_emoji_demo", data_dir=demo_dir)
    assert builder.info.features["label"].names == list(emoji_demo.CLASS_NAMES)
    examples = list(builder.as_dataset(split="train").as_numpy_iterator())
    assert 1800 <= len(examples) <= 1900
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    assert images.shape[1:] == (64, 64, 3) and images.dtype == np.uint8
    assert len({im.tobytes() for im in images}) == len(images)
    assert len({int(e["codepoint"]) for e in examples}) == len(images)
    counts = np.bincount(labels, minlength=len(emoji_demo.CLASS_NAMES))
    assert len(counts) == len(emoji_demo.CLASS_NAMES) and counts.min() >= 50
    assert (images.reshape(len(images), -1).std(axis=1) > 10).all()  # No blank renders.
    # Colour, not black-and-white outlines: chroma (max - min channel) over the drawn pixels.
    rgb = images.astype(np.float32)
    drawn = rgb.min(-1) < 240
    chroma = ((rgb.max(-1) - rgb.min(-1)) * drawn).sum((1, 2)) / drawn.sum((1, 2))
    assert np.median(chroma) > 30 and (chroma > 40).mean() > 0.5
    assert (images[:, 0, :] == 255).mean() > 0.9  # White background at the top row.
    assert emoji_demo.emoji_class(0x1F600) == emoji_demo.CLASS_NAMES.index("smileys_people")
    assert emoji_demo.emoji_class(0x1F34E) == emoji_demo.CLASS_NAMES.index("food_drink")


def test_curated_demo_is_the_six_lookalike_groups_of_the_same_renders(demo_dir):
    """The quick start's subset: every image is the full set's render of the same codepoint,
    labelled by its group, and each group is the codepoints its ranges name."""
    full = {int(e["codepoint"]): e["image"] for e in tfds.builder(
        "pdm_emoji_demo", data_dir=demo_dir).as_dataset(split="train").as_numpy_iterator()}
    builder = tfds.builder("pdm_emoji_demo/curated", data_dir=demo_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()
    assert builder.info.features["label"].names == list(emoji_demo.CURATED_CLASS_NAMES)
    examples = list(builder.as_dataset(split="train").as_numpy_iterator())
    codepoints = [int(e["codepoint"]) for e in examples]
    labels = np.array([e["label"] for e in examples])
    assert len(examples) == 227 and len(set(codepoints)) == 227
    for e in examples:
        np.testing.assert_array_equal(e["image"], full[int(e["codepoint"])])
        assert e["label"] == emoji_demo.curated_class(int(e["codepoint"]))
    assert set(codepoints) == {cp for cp in full if emoji_demo.curated_class(cp) is not None}
    names = emoji_demo.CURATED_CLASS_NAMES
    assert np.bincount(labels, minlength=len(names)).tolist() == [122, 22, 27, 24, 13, 19]
    assert labels[codepoints.index(0x1F600)] == names.index("faces")
    assert labels[codepoints.index(0x1F551)] == names.index("clocks")
    assert emoji_demo.curated_class(0x1F645) is None  # a gesturing person, not a face


# ---------------------------------------------------------------------------------------------
# (g) Bad arguments.


@pytest.mark.parametrize("config,kwargs,match", [
    (dict(name="no_such_dataset_xyz", image_size=8), {}, "no_such_dataset_xyz"),
    (dict(name="folder", folder="/no/such/dir", image_size=8), {}, "/no/such/dir"),
    (dict(name="pdm_emoji_demo", image_size=0), {}, "image_size must be a positive int, got 0"),
    (dict(name="pdm_emoji_demo", image_size=-4), {}, "got -4"),
    (dict(name="pdm_emoji_demo", image_size=8), dict(global_batch_size=10, process_count=4),
     "global_batch_size=10 .* process_count=4"),
    (dict(name="pdm_emoji_demo", image_size=8, shuffle_buffer=-1), {}, "shuffle_buffer"),
    (dict(image_size=8), {}, "'name'"),
])
def test_bad_arguments_raise_value_error_naming_the_value(config, kwargs, match):
    args = dict(dict(global_batch_size=8, seed=0, process_index=0, process_count=1), **kwargs)
    with pytest.raises(ValueError, match=match):
        pipeline.make_train_dataset(config, **args)


def test_check_available_names_what_a_manual_download_dataset_needs(tmp_path):
    config = dict(name="imagenet2012", image_size=8, data_dir=str(tmp_path / "tfds"))
    hint = (r"pass --config.data.manual_dir=DIR holding the manual download "
            r"\(ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar\), or "
            r"--config.data.data_dir=DIR where it is prepared already\.$")
    with pytest.raises(FileNotFoundError, match=r"^Dataset 'imagenet2012' is not prepared in "
                                                r".*tfds.* needs a manual download: " + hint):
        datasets.check_available(config)
    missing_dir = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=rf"^data.manual_dir='{missing_dir}' is not a "
                                                rf"directory; " + hint):
        datasets.check_available(dict(config, manual_dir=missing_dir))
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks \['ILSVRC2012_img_train.tar'\] that "
                                                r"'imagenet2012' needs"):
        datasets.check_available(dict(config, manual_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="Unknown dataset name 'no_such_dataset_xyz'"):
        datasets.check_available(dict(name="no_such_dataset_xyz", image_size=8))
