"""The absl entry point as a user runs it: ``python -m pdm_jax.main --config=... --mode=...``.

Each ``pdm_jax.main`` subprocess costs about 8-10 s of imports; none of them compiles anything.
Bad config values are also checked in-process through the train job, whose first act is the
one validation pass (config_validation.validate).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, demo_config
from pdm_jax import sharding
from pdm_jax.diffusion.experts import experts_from_config
from pdm_jax.jobs import train as train_job
from pdm_jax.training.state import setup_experts


def run_module(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                    XLA_FLAGS="--xla_force_host_platform_device_count=8", **env)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)


def run_main(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run_module("pdm_jax.main", *args, **env)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The last line of stderr: the exception absl's app.run ends with."""
    assert result.returncode != 0, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_summary_prints_the_table_and_writes_summary_json(tmp_path):
    result = run_main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}", "--mode=summary")
    assert result.returncode == 0, result.stderr[-3000:]
    header, rule, *rows = result.stdout.strip().splitlines()[-4:]
    assert header.split() == ["expert", "SNR", "interval", "P", "image", "params", "(M)",
                              "GMACs/fwd", "steps"]
    assert set(rule) == {"-"} and len(rows) == 2
    assert rows[0].split()[:5] == ["0", "(0.25,", "inf]", "2", "16"]
    assert rows[1].split()[:5] == ["1", "(0,", "0.25]", "4", "16"]

    # Strict JSON: the open upper SNR bound is null, never the non-standard Infinity.
    summary = json.loads((tmp_path / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert summary["sample_steps"] == "5"
    high_snr, low_snr = summary["experts"]
    assert high_snr["snr_interval"] == [0.25, None] and low_snr["snr_interval"] == [0, 0.25]
    assert [e["patch_size"] for e in summary["experts"]] == [2, 4]
    # Parameter counts agree with the train state's own abstract parameters.
    setups = setup_experts(demo_config("smoke"), sharding.make_mesh((-1, 1)))
    for row, setup in zip(summary["experts"], setups, strict=True):
        assert row["params"] == setup.num_params()
        assert row["image_size"] == 16 and row["warm_start"] is None
    # Patch 4 runs the U-Net body on a 4x4 grid instead of 8x8: several times fewer MACs
    # (0.017 vs 0.005 GMACs, rounded to 3 decimals).
    assert high_snr["gmacs_per_forward"] > 2 * low_snr["gmacs_per_forward"] > 0
    # The 5 respaced steps are t = 0, 250, 500, 749, 999; SNR > 0.25 means t <= 395.
    assert [high_snr["sampling_steps"], low_snr["sampling_steps"]] == [2, 3]


@pytest.mark.parametrize("key, value, message", [
    ("model.patch_size", 3, "patch_size=3 does not divide image_size=16"),
    ("diffusion.schedule", "bogus", "unknown beta schedule 'bogus'"),
    ("train.fid_every", -1, "train.fid_every must be >= 0"),
    ("train.fid_every", 5, "eval.inception_path is empty"),
    ("train.batch_size", 12, "train.batch_size=12 must be a multiple of the 8 devices"),
])
def test_bad_config_values_fail_with_a_clear_message_before_anything_runs(
        tmp_path, key, value, message):
    config = demo_config("smoke")
    config.update_from_flattened_dict({key: value})
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(message)):
        train_job.run(config, str(workdir))
    # Validation precedes everything else in the train job: not even the workdir was created,
    # so no data was loaded and nothing compiled.
    assert not workdir.exists()


@pytest.mark.slow
def test_cli_overrides_are_validated_before_the_workdir_is_created(tmp_path):
    """--config.train.batch_size=12 is what the train job sees, and it is refused for not
    splitting over the 8 devices before anything is written."""
    workdir = tmp_path / "run"
    result = run_main("--config=configs/demo.py:smoke", f"--workdir={workdir}",
                      "--config.train.batch_size=12")
    assert error_line(result) == (
        "ValueError: train.batch_size=12 must be a multiple of the 8 devices (every device "
        "takes an equal share of a batch)."), result.stderr[-3000:]
    assert not workdir.exists()


@pytest.mark.slow
def test_imagenet_without_manual_dir_stops_at_validation_naming_the_flag(tmp_path):
    """imagenet2012 needs a manual download: with nothing prepared in data.data_dir and no
    data.manual_dir the run stops at validation, before any model is built or data read."""
    data_dir, workdir = tmp_path / "tfds", tmp_path / "in256"
    data_dir.mkdir()
    result = run_main("--config=configs/imagenet256.py", f"--workdir={workdir}",
                      f"--config.data.data_dir={data_dir}")
    line = error_line(result)
    # One line that names the flag to pass, and the data_dir override that reached the check.
    assert line.startswith("FileNotFoundError: Dataset 'imagenet2012' is not prepared in "
                           f"{data_dir}/imagenet2012"), result.stderr[-3000:]
    assert "--config.data.manual_dir=DIR" in line and "ILSVRC2012_img_train.tar" in line
    assert not (workdir / "checkpoints").exists() and not workdir.exists()
    assert list(data_dir.iterdir()) == []  # nothing downloaded or prepared
    # Stopped before the mesh and the 256 px ensemble were built (train.py logs both after
    # validation). Checked by what ran, not by a wall-time bound a loaded machine breaks.
    assert "Mesh {" not in result.stderr and "M parameters" not in result.stderr


@pytest.mark.slow
def test_sample_on_an_empty_workdir_names_the_missing_checkpoint_before_compiling(tmp_path):
    # JAX_LOG_COMPILES=1 makes JAX log "Compiling jit(...)" (a warning) for every compile.
    result = run_main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
                      "--mode=sample", JAX_LOG_COMPILES="1")
    line = error_line(result)
    expert = experts_from_config(demo_config("smoke"))[0]
    assert line.startswith("FileNotFoundError: --mode=sample: expert 0 (SNR in (0.25, inf]"), \
        result.stderr[-3000:]
    assert f"has no checkpoint under {tmp_path}/checkpoints/{expert.name};" in line
    assert "train it first" in line
    assert "Compiling" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no samples/ (nor anything else) written


def test_old_evaluate_command_path_still_runs_and_warns():
    """``python -m pdm_jax.evaluate`` is a shim of ``python -m pdm_jax.cli.evaluate`` that warns
    (both import only absl at the top: a fraction of a second each)."""
    old = run_module("pdm_jax.evaluate", "--help")
    new = run_module("pdm_jax.cli.evaluate", "--help")
    assert "FutureWarning: pdm_jax.evaluate moved: use pdm_jax.cli.evaluate" in old.stderr
    assert "FutureWarning" not in new.stderr
    # The same help (absl's --help exits with status 1 after printing it).
    assert old.stdout == new.stdout and old.returncode == new.returncode == 1
    assert "python -m pdm_jax.cli.evaluate REF.npz SAMPLES.npz" in old.stdout
    assert "--inception_path" in old.stdout
