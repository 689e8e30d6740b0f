"""Test set-up: 8 virtual CPU devices so every sharding path runs, set before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN_DIR


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """A persistent XLA compilation cache for one test module (and the subprocesses it starts).

    Tests that build the same jitted program several times (train() calls, a fresh process
    loading an export, two feature functions of one network) then compile it once. Threshold 0:
    orbax's checkpoint writes also jit hundreds of tiny slices, and loading those is cheaper
    than compiling them again. Yields the cache directory; restores the previous settings.
    """
    from jax.experimental.compilation_cache import compilation_cache

    path = str(tmp_path_factory.mktemp("xla_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (path, 0.0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield path
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


# The test files whose module fixtures train or compile large programs, longest first. With
# `-n 2 --dist loadfile` xdist hands out whole files in collection order, so starting the long
# ones first keeps both workers busy to the end instead of one finishing a long file alone.
LONG_FILES = ("test_train_e2e.py", "test_export.py", "test_multiprocess.py",
              "test_fid_metrics.py", "test_experts.py", "test_inception.py", "test_benchmarks.py",
              "test_topology_restore.py", "test_analysis.py", "test_main_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
