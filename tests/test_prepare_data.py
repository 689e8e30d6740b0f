"""``--mode=prepare_data``: the dataset is prepared once, by one process, into data.data_dir; a
multi-process training run refuses to prepare anything but the demo from every process."""

import os
import subprocess
import sys

import jax
import pytest
import tensorflow_datasets as tfds

from conftest import REPO, demo_config
from pdm_jax import config_validation
from pdm_jax.data import datasets, pipeline
from pdm_jax.jobs import prepare_data


def _demo(data_dir, **data):
    config = demo_config("smoke")
    with config.unlocked():
        config.data.data_dir = str(data_dir)
        config.data.update(data)
    return config


def test_prepare_data_builds_the_demo_into_data_dir_once(tmp_path, caplog):
    data_dir = tmp_path / "tfds"
    config = _demo(data_dir)
    # Only the data section is checked: a mesh this host cannot build is no obstacle.
    with config.unlocked():
        config.mesh.shape = (-1, 16)
    assert not tfds.builder(config.data.name, data_dir=str(data_dir)).is_prepared()
    path = prepare_data.run(config, str(tmp_path / "workdir"))
    builder = tfds.builder(config.data.name, data_dir=str(data_dir))
    assert builder.is_prepared() and path == str(builder.data_dir)
    assert path.startswith(str(data_dir))
    assert not (tmp_path / "workdir").exists()  # nothing is written to the workdir
    files = sorted(p for p in os.listdir(path))
    with caplog.at_level("INFO"):
        assert prepare_data.run(config, str(tmp_path / "workdir")) == path
    assert "prepared already" in caplog.text
    assert sorted(os.listdir(path)) == files


def test_prepare_data_runs_as_one_process_only(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(ValueError, match=r"^--mode=prepare_data runs as ONE process \(4 were "
                                         r"started\)"):
        prepare_data.run(_demo(tmp_path / "tfds"), str(tmp_path))
    assert not (tmp_path / "tfds").exists()


def test_prepare_data_rejects_folders_and_names_what_a_manual_dataset_needs(tmp_path, folder16):
    with pytest.raises(ValueError, match=r"data.name='folder' reads data.folder=.* directly "
                                         r"\(nothing to prepare\)"):
        config_validation.validate(_demo(tmp_path, name="folder", folder=str(folder16)), "prepare_data")
    with pytest.raises(FileNotFoundError, match=r"needs a manual download: pass "
                                                r"--config.data.manual_dir=DIR"):
        config_validation.validate(_demo(tmp_path, name="imagenet2012"), "prepare_data")


@pytest.mark.parametrize("check", ["validation", "pipeline"])
def test_multi_process_training_refuses_to_prepare_a_large_dataset(tmp_path, monkeypatch, check):
    data = dict(name="mnist", image_size=28, data_dir=str(tmp_path / "tfds"))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    message = (r"^Dataset 'mnist' is not prepared in .*, and this run has 2 processes, each of "
               r"which would prepare it on its own\. Prepare it once first: python -m "
               r"pdm_jax.main --mode=prepare_data")
    with pytest.raises(FileNotFoundError, match=message):
        if check == "validation":  # config_validation.validate(config, "train") calls this
            datasets.check_available(data)
        else:  # the dataset's own preparation path, for callers that skip validation
            pipeline.make_train_dataset(data, global_batch_size=2, seed=0, process_index=0,
                                        process_count=2)
    assert not tfds.builder("mnist", data_dir=data["data_dir"]).is_prepared()


def test_manual_download_datasets_are_refused_naming_manual_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(FileNotFoundError, match=r"data.data_dir every process reads .* and "
                                                r"data.manual_dir\)"):
        datasets.check_available(dict(name="imagenet2012", image_size=8,
                                      data_dir=str(tmp_path / "tfds")))


def test_the_demo_is_still_built_on_first_use_by_several_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    data_dir = str(tmp_path / "tfds")
    assert datasets.check_available(dict(name="pdm_emoji_demo", image_size=64,
                                         data_dir=data_dir, class_conditional=True)) == 8
    assert not tfds.builder("pdm_emoji_demo", data_dir=data_dir).is_prepared()


@pytest.mark.slow
def test_main_mode_prepare_data(tmp_path):
    """The user's command (about 10 s of imports): --mode=prepare_data is a mode of main."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-m", "pdm_jax.main", "--config=configs/demo.py",
         f"--workdir={tmp_path / 'run'}", "--mode=prepare_data",
         f"--config.data.data_dir={tmp_path / 'tfds'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tfds.builder("pdm_emoji_demo/curated", data_dir=str(tmp_path / "tfds")).is_prepared()
    assert "is prepared in" in result.stderr
