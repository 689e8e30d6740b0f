"""Timestep-split ensembles (SPEC 6): interval validation, dispatch, per-expert training, warm
start and the released recipes' summaries."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from pdm_jax import sample, sharding, summary, train, train_state
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.experts import (
    dispatching_model_fn, experts_from_config, sampling_steps_per_expert)

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("intervals, message", [
    ([(0.25, math.inf), (0.0, 0.2)], "must partition the chain"),           # gap (0.2, 0.25]
    ([(0.2, math.inf), (0.0, 0.25)], "must partition the chain"),           # overlap
    ([(0.25, math.inf), (0.3, 0.25)], r"must satisfy 0 <= lo < hi"),       # reversed bounds
])
def test_intervals_with_gaps_or_overlaps_are_rejected(intervals, message):
    config = load_config("demo", "smoke")
    config.experts = [dict(snr_interval=i) for i in intervals]
    with pytest.raises(ValueError, match=message):
        experts_from_config(config)


def test_expert_override_typos_and_mismatched_experts_are_rejected():
    config = load_config("demo", "smoke")
    config.experts[1]["model"]["patch_sise"] = 4
    with pytest.raises(ValueError, match="Unknown expert override key 'patch_sise'"):
        experts_from_config(config)
    config = load_config("demo", "smoke")
    config.experts[1]["model"]["learn_sigma"] = False
    with pytest.raises(ValueError, match="experts of one ensemble must agree on it"):
        experts_from_config(config)


def test_linear_250_steps_split_at_snr_quarter_gives_99_and_151():
    config = load_config("imagenet256")
    experts = experts_from_config(config)
    respaced = Schedule.from_name("linear").respace("250")
    assert [e.snr_interval for e in experts] == [(0.25, math.inf), (0.0, 0.25)]
    assert sampling_steps_per_expert(experts, respaced) == [99, 151]


def test_imagenet_summary_project_and_paper_recipes():
    project = summary.summarize(load_config("imagenet256"))["experts"]
    assert [e["patch_size"] for e in project] == [1, 4]
    assert [e["snr_interval"] for e in project] == [[0.25, math.inf], [0.0, 0.25]]
    assert [e["sampling_steps"] for e in project] == [99, 151]
    paper = summary.summarize(load_config("imagenet256", "recipe=paper"))["experts"]
    assert [e["patch_size"] for e in paper] == [4, 4]
    for expert in paper:
        assert abs(expert["params"] / 1e6 - 202.1) / 202.1 < 0.005
        assert abs(expert["gmacs_per_forward"] - 125) / 125 < 0.01
    assert paper[0]["warm_start"] == {"workdir": "", "expert": 1}
    swapped = summary.summarize(load_config("imagenet256", "swap"))["experts"]
    assert [e["patch_size"] for e in swapped] == [4, 1]


@pytest.mark.parametrize("name, arg, params_m, gmacs", [
    ("lsun_church256", "patch=2", 122.9, 104),
    ("lsun_church256", "patch=4", 121.4, 66),
    ("lsun_church256", "patch=8", 121.0, 28),
    ("ffhq1024", None, 162.6, 420),
])
def test_recipe_configs_hit_the_spec_table(name, arg, params_m, gmacs):
    (expert,) = summary.summarize(load_config(name, arg))["experts"]
    assert abs(expert["params"] / 1e6 - params_m) / params_m < 0.005
    assert abs(expert["gmacs_per_forward"] - gmacs) / gmacs < 0.02


def _random_params(expert, seed):
    model = nnx.eval_shape(lambda: __import__("pdm_jax.models.unet", fromlist=["UNet"]).UNet(
        expert.model, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
                        state)


def test_dispatch_runs_only_the_owning_expert_and_sampling_uses_both():
    config = load_config("demo", "smoke")
    experts = experts_from_config(config)
    graphdefs = [train_state.model_graphdef(e.model) for e in experts]
    params = [_random_params(e, k) for k, e in enumerate(experts)]
    perturbed = [params[0], jax.tree.map(lambda a: a + 0.1, params[1])]
    full = Schedule.from_name("linear")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    y = jnp.array([1, 8])

    def run(p, t):
        fn = jax.jit(lambda p, x, t, y: dispatching_model_fn(experts, graphdefs, p, full)(x, t, y))
        return fn(p, x, jnp.full((2,), t, jnp.int32), y)[0]

    # t=395 belongs to the low-noise expert 0, t=396 to the high-noise expert 1.
    np.testing.assert_array_equal(run(params, 395), run(perturbed, 395))
    assert not np.allclose(run(params, 396), run(perturbed, 396))
    # The sampler calls the dispatch inside its scan: perturbing either expert changes samples.
    mesh = sharding.make_mesh((-1, 1))
    # Unguided: with guidance the x0 of the last steps is x_t - sqrt(1 - abar) eps, which hides
    # most of the low-noise expert's output; the guided dispatch is the same lax.switch.
    sample_fn = sample.make_sample_fn(config, mesh, steps="10", sampler="ddim", eta=0.0,
                                      guidance_scale=1.0, batch_size=8)
    labels = jnp.arange(8) % 8
    base = np.asarray(sample_fn(params, jax.random.PRNGKey(0), labels))
    for k in range(2):
        changed = list(params)
        changed[k] = jax.tree.map(lambda a: a + 0.1, params[k])
        diff = np.abs(np.asarray(sample_fn(changed, jax.random.PRNGKey(0), labels)) - base)
        assert diff.max() > 1e-2, f"expert {k} does not affect sampling ({diff.max()})"


@pytest.fixture(scope="module")
def paper_workdir(tmp_path_factory):
    """The paper recipe at smoke size: expert 1 (high noise) trained alone for 2 steps."""
    workdir = str(tmp_path_factory.mktemp("paper"))
    config = load_config("imagenet256", "smoke,recipe=paper")
    config.train.expert = 1
    config.train.num_steps = 2
    with tfds.testing.mock_data(num_examples=16):
        train.train(config, workdir)
    return workdir, config


@pytest.mark.slow
def test_training_one_expert_writes_only_its_checkpoints(paper_workdir):
    workdir, config = paper_workdir
    experts = experts_from_config(config)
    root = pathlib.Path(workdir, "checkpoints")
    assert sorted(p.name for p in root.iterdir()) == [experts[1].name]
    assert sorted(p.name for p in (root / experts[1].name).iterdir()) == ["2"]


@pytest.mark.slow
def test_warm_start_copies_the_source_ema_exactly(paper_workdir):
    workdir, config = paper_workdir
    low = experts_from_config(config)[0]
    mesh = sharding.make_mesh((-1, 1))
    tx = train_state.make_optimizer(low.optim)
    abstract, _ = train_state.state_shardings(low.model, tx, mesh)
    fresh = train_state.create_state(low.model, tx, mesh, seed=0)
    warm = train._warm_start(low, fresh, abstract, mesh, workdir)
    source = sample.load_expert_ema(workdir, 1, mesh)
    for got, ema, want in zip(jax.tree.leaves(warm["params"]), jax.tree.leaves(warm["ema"]),
                              jax.tree.leaves(source)):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ema, want)
    assert low.optim.lr == 5e-5 and low.optim.warmup_steps == 10_000 and low.optim.b2 == 0.999


def test_sampling_with_a_missing_expert_names_it(tmp_path):
    config = load_config("demo", "smoke")
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for expert 0 \(SNR in"):
        sample.load_expert_ema(str(tmp_path), 0, sharding.make_mesh((-1, 1)), config)
