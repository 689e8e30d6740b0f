"""Timestep-split ensembles (SPEC 6): interval validation, dispatch, per-expert training, warm
start and the released recipes' summaries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from conftest import load_config, random_state
from pdm_jax import checkpointing, io as io_lib, run_loading, sampling, sharding
from pdm_jax.diffusion.experts import (
    dispatching_model_fn, experts_from_config, sampling_steps_per_expert)
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.jobs import summary
from pdm_jax.jobs import train as train_job
from pdm_jax.training import state as state_lib


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
    config = load_config("imagenet256", None)
    experts = experts_from_config(config)
    respaced = Schedule.from_name("linear").respace("250")
    assert [e.snr_interval for e in experts] == [(0.25, math.inf), (0.0, 0.25)]
    assert sampling_steps_per_expert(experts, respaced) == [99, 151]


def test_imagenet_summary_project_and_paper_recipes():
    project = summary.summarize(load_config("imagenet256", None))["experts"]
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


def test_dispatch_runs_only_the_owning_expert_and_sampling_uses_both():
    config = load_config("demo", "smoke")
    experts = experts_from_config(config)
    graphdefs = [state_lib.model_graphdef(e.model) for e in experts]
    mesh = sharding.make_mesh((-1, 1))
    params = [random_state(s.abstract["params"], k)
              for k, s in enumerate(state_lib.setup_experts(config, mesh))]
    perturbed = [params[0], jax.tree.map(lambda a: a + 0.1, params[1])]
    full = Schedule.from_name("linear")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    y = jnp.array([1, config.model.num_classes])  # a class and the null label

    def dispatch(p, x, t, y):
        model_fns = [lambda x, t, y, g=g, q=q: nnx.merge(g, q)(x, t, y)
                     for g, q in zip(graphdefs, p)]
        return dispatching_model_fn(experts, model_fns, full)(x, t, y)

    def run(p, t):
        return jax.jit(dispatch)(p, x, jnp.full((2,), t, jnp.int32), y)[0]

    # t=395 belongs to the low-noise expert 0, t=396 to the high-noise expert 1.
    np.testing.assert_array_equal(run(params, 395), run(perturbed, 395))
    assert not np.allclose(run(params, 396), run(perturbed, 396))
    # The sampler calls the dispatch inside its scan: perturbing either expert changes samples.
    # Unguided: with guidance the x0 of the last steps is x_t - sqrt(1 - abar) eps, which hides
    # most of the low-noise expert's output; the guided dispatch is the same lax.switch.
    sample_fn = sampling.make_sample_fn(config, mesh, steps="10", sampler="ddim", eta=0.0,
                                        guidance_scale=1.0, batch_size=8)
    labels = jnp.arange(8) % config.model.num_classes
    base = np.asarray(sample_fn(params, jax.random.PRNGKey(0), labels))
    for k in range(2):
        changed = list(params)
        changed[k] = jax.tree.map(lambda a: a + 0.1, params[k])
        diff = np.abs(np.asarray(sample_fn(changed, jax.random.PRNGKey(0), labels)) - base)
        assert diff.max() > 1e-2, f"expert {k} does not affect sampling ({diff.max()})"


@pytest.fixture(scope="module")
def paper_source(tmp_path_factory):
    """The paper recipe at smoke size with a checkpoint of expert 1 (high noise) only: a random
    train state saved at step 2, as training expert 1 alone would leave it (no train step runs).

    Returns:
      (workdir, config, the saved state as host numpy arrays).
    """
    workdir = str(tmp_path_factory.mktemp("paper"))
    config = load_config("imagenet256", "smoke,recipe=paper")
    mesh = sharding.make_mesh((-1, 1))
    (setup,) = state_lib.setup_experts(config, mesh, [1])
    state = random_state(setup.abstract, seed=1)
    io_lib.write_atomic(f"{workdir}/{checkpointing.CONFIG_FILE}",
                        config.to_json_best_effort(indent=2, sort_keys=True))
    ckpts = checkpointing.ExpertCheckpoints(workdir, [setup], every=1, keep=1, async_save=False)
    ckpts.save(2, {setup.name: state}, {})
    ckpts.close()
    return workdir, config, jax.device_get(state)


def test_warm_start_copies_the_source_ema_exactly(paper_source):
    workdir, config, source = paper_source
    mesh = sharding.make_mesh((-1, 1))
    (low,) = state_lib.setup_experts(config, mesh, [0])
    assert (low.expert.warm_start_workdir, low.expert.warm_start_expert) == ("", 1)
    assert run_loading.latest_expert_step(workdir, low.name) is None  # only expert 1 saved
    fresh = random_state(low.abstract, seed=2)
    warm = run_loading.warm_start(low, fresh, workdir, mesh)
    targets = jax.tree.leaves(low.abstract["params"])
    for got, ema, want, target in zip(jax.tree.leaves(warm["params"]),
                                      jax.tree.leaves(warm["ema"]),
                                      jax.tree.leaves(source["ema"]), targets, strict=True):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ema, want)
        assert got.sharding == target.sharding and ema.sharding == target.sharding
    # The source's raw parameters differ from its EMA: the EMA is what was copied.
    assert not np.array_equal(jax.tree.leaves(source["params"])[0],
                              jax.tree.leaves(source["ema"])[0])
    # The optimiser state, step and rng stay the fresh state's.
    for key in ("opt_state", "step", "rng"):
        jax.tree.map(np.testing.assert_array_equal, warm[key], fresh[key])
    assert low.expert.optim.lr == 5e-5 and low.expert.optim.warmup_steps == 10_000
    assert low.expert.optim.b2 == 0.999


@pytest.mark.slow
def test_training_one_expert_writes_only_its_checkpoints(tmp_path, monkeypatch):
    """train.expert=1 of two: only expert 1's state is set up, checkpointed and logged.

    The jitted train step is replaced by one that returns the states unchanged: this is the
    job's bookkeeping, not the update (test_train_e2e trains for real), so nothing as large as a
    train step compiles.
    """
    config = load_config("imagenet256", "smoke,recipe=paper")
    config.train.expert = 1
    config.train.num_steps = 2
    high = experts_from_config(config)[1]
    steps = []

    def fake_jit_train_step(config, setups, schedule, mesh):
        assert [s.name for s in setups] == [high.name]

        def step(states, batch):
            steps.append((sorted(states), batch["image"].shape))
            return states, {"loss": jnp.zeros(()), "nonfinite": jnp.zeros(())}

        return step

    monkeypatch.setattr(train_job, "jit_train_step", fake_jit_train_step)
    # imagenet2012 needs its manual download to pass validation (placeholders: mock_data
    # serves random examples in their place; USE_CODE: offline, features from the code).
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (manual / name).touch()
    config.data.manual_dir = str(manual)
    config.data.data_dir = str(tmp_path / "tfds")
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=16, data_dir=config.data.data_dir,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        states = train_job.run(config, str(workdir))
    assert sorted(states) == [high.name]
    assert steps == [([high.name], (8, 16, 16, 3))] * 2
    root = workdir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [high.name]
    assert sorted(p.name for p in (root / high.name).iterdir()) == ["2"]
    # A run of one expert of several logs to its own metrics file.
    assert (workdir / f"metrics.{high.name}.jsonl").exists()
    assert not (workdir / "metrics.jsonl").exists()


def test_missing_experts_are_named_when_sampling_or_warm_starting(tmp_path):
    config = load_config("demo", "smoke")
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    mesh = sharding.make_mesh((-1, 1))
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for expert 0 \(SNR in"):
        run_loading.load_expert_ema(str(tmp_path), 0, mesh, config)
    # A warm start whose source expert was never trained names it (and how to train it).
    paper = load_config("imagenet256", "smoke,recipe=paper")
    (tmp_path / "config.json").write_text(paper.to_json_best_effort())
    (low,) = state_lib.setup_experts(paper, mesh, [0])
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for expert 1 .*"
                                                r"--config\.train\.expert=1"):
        run_loading.warm_start(low, {}, str(tmp_path), mesh)
