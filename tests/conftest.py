"""Test set-up: 8 virtual CPU devices so every sharding path runs, set before JAX initialises;
one persistent XLA cache shared by every test process of a session; the shared trained run."""

import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Through the environment, so every subprocess a test starts compiles the same programs and
# finds them in the session's XLA cache.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import jax  # noqa: E402
import pytest  # noqa: E402

from pdm_jax import config_lib  # noqa: E402


REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"


def pytest_configure(config):
    """One persistent XLA compilation cache for the session, shared by the xdist workers and
    every subprocess they start (through the environment): a program that several test files
    (or a test and the subprocess it starts) build is compiled once. Threshold 0: orbax's
    checkpoint writes also jit small programs, and loading those is cheaper than compiling them
    again. The controller (or a run without xdist) creates it; workers inherit it."""
    path = os.environ.get("PDM_JAX_TESTS_XLA_CACHE")
    if not path:
        path = tempfile.mkdtemp(prefix="pdm_jax_tests_xla_cache_")
        os.environ["PDM_JAX_TESTS_XLA_CACHE"] = path
        config.pdm_jax_owns_cache = True
    os.environ.update(JAX_COMPILATION_CACHE_DIR=path,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if getattr(config, "pdm_jax_owns_cache", False):
        import shutil

        shutil.rmtree(os.environ.pop("PDM_JAX_TESTS_XLA_CACHE"), ignore_errors=True)


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def xla_cache() -> str:
    """The session's persistent XLA cache directory (set for every test; see pytest_configure)."""
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


def golden_torch_state(golden) -> dict:
    """A golden file's PyTorch state_dict: its ``torch_state/<name>`` arrays by official name."""
    return {k.split("/", 1)[1]: golden[k] for k in golden.files if k.startswith("torch_state/")}


def demo_config(arg: str = "smoke"):
    """``configs/demo.py``'s get_config(arg)."""
    return config_lib.load_config(REPO / "configs" / "demo.py", arg)


def load_config(name: str, arg: str = "smoke"):
    """``configs/<name>.py``'s get_config(arg)."""
    return config_lib.load_config(REPO / "configs" / f"{name}.py", arg)


def write_pngs(root: pathlib.Path, images_per_class: dict) -> pathlib.Path:
    """Writes uint8 HWC arrays as PNGs into one sub-folder per class; returns ``root``."""
    from PIL import Image

    for name, images in images_per_class.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"{i:02d}.png")
    return root


def ramp_images():
    """16 images of 20x24 px in 2 classes: horizontal vs vertical colour ramps."""
    import numpy as np

    ramp = np.linspace(0, 255, 24)
    colours = [np.array(c) / 255 for c in
               ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
                (0, 255, 255), (255, 0, 255), (255, 128, 0), (128, 128, 255))]
    horizontal = [np.broadcast_to(ramp[None, :, None] * c, (20, 24, 3)).astype(np.uint8)
                  for c in colours]
    vertical = [np.broadcast_to(ramp[:20, None, None] * c, (20, 24, 3)).astype(np.uint8)
                for c in colours]
    return {"horizontal": horizontal, "vertical": vertical}


@pytest.fixture(scope="session")
def folder16(tmp_path_factory) -> pathlib.Path:
    """An image folder: 16 PNGs of 20x24 px in 2 class sub-folders (colour ramps)."""
    return write_pngs(tmp_path_factory.mktemp("folder16"), ramp_images())


def random_state(abstract, seed: int):
    """Random values for every leaf of an abstract state (ShapeDtypeStructs with shardings),
    each placed with its leaf's sharding: floats N(0, 0.2^2), integers and key data uniform.
    A checkpoint of such states stands in for a trained run where no test needs the training.

    The train state's rng is a raw uint32 key (jax.random.PRNGKey); a typed key leaf would get
    random key data wrapped as a key of its own implementation.
    """
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def one(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            shape = jax.eval_shape(jax.random.key_data, leaf).shape
            data = rng.integers(0, 2**32, shape, dtype=np.uint32)
            return jax.device_put(jax.random.wrap_key_data(data, impl=leaf.dtype._impl),
                                  leaf.sharding)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            value = 0.2 * rng.standard_normal(leaf.shape)
        else:
            value = rng.integers(0, 1000, leaf.shape)
        return jax.device_put(np.asarray(value, leaf.dtype), leaf.sharding)

    return jax.tree.map(one, abstract)


def write_random_run(workdir, config, step: int, seed: int = 0) -> dict:
    """A workdir as training ``config`` to ``step`` would leave it (config.json, every expert's
    checkpoint), holding random states; returns {expert name: state}."""
    from pdm_jax import checkpointing, io as io_lib, sharding
    from pdm_jax.training.state import setup_experts

    setups = setup_experts(config, sharding.make_mesh(config.mesh.shape))
    states = {s.name: random_state(s.abstract, seed + k) for k, s in enumerate(setups)}
    io_lib.write_atomic(f"{workdir}/{checkpointing.CONFIG_FILE}",
                        config.to_json_best_effort(indent=2, sort_keys=True))
    ckpts = checkpointing.ExpertCheckpoints(str(workdir), setups, every=1, keep=1)
    ckpts.save(step, states, {})
    ckpts.close()
    return states


TRAINED_STEPS = 30
TRAINED_CKPTS = (10, 20, 30)  # the trained run's checkpoints (ckpt.every=10, keep=3)


def folder_config(folder, *, num_steps: int, ckpt_every: int):
    """configs/demo.py:smoke (two experts, 16x16, batch 16) on an image folder; runs that differ
    only in these host-side fields lower the same train step."""
    c = demo_config("smoke")
    c.data.name, c.data.folder = "folder", str(folder)
    c.train.num_steps, c.ckpt.every = num_steps, ckpt_every
    return c


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, folder16):
    """The session's one trained two-expert run: TRAINED_STEPS steps of configs/demo.py:smoke on
    ``folder16``, checkpoints at TRAINED_CKPTS. Shared by the files of xdist group "trained_run"
    (training end to end, kills and resumes, export and inference), so the suite trains it once;
    resumed copies of it are compared with it bitwise."""
    import types

    from pdm_jax.jobs import train

    workdir = tmp_path_factory.mktemp("trained_run")
    config = folder_config(folder16, num_steps=TRAINED_STEPS, ckpt_every=TRAINED_CKPTS[0])
    config.ckpt.keep = len(TRAINED_CKPTS)
    state = train.run(config, str(workdir))
    return types.SimpleNamespace(workdir=workdir, config=config, state=state, folder=folder16)


# The test files whose fixtures train or compile large programs, longest first. With
# `-n 2 --dist loadgroup` xdist hands out whole groups in collection order (a group is a file,
# or files that share a session fixture through an explicit xdist_group mark), so starting the
# long ones first keeps both workers busy to the end.
LONG_FILES = ("test_train_e2e.py", "test_export.py", "test_multiprocess.py",
              "test_fid_metrics.py", "test_experts.py", "test_inception.py", "test_benchmarks.py",
              "test_topology_restore.py", "test_analysis.py", "test_main_cli.py")


def pytest_itemcollected(item):
    """A file is one xdist group unless it names a shared one (before xdist reads the groups)."""
    if item.get_closest_marker("xdist_group") is None:
        item.add_marker(pytest.mark.xdist_group(item.path.name))


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
