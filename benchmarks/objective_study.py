"""Objective study: x0 vs eps vs v outputs at P=1 and P=4, compared by denoising MSE at fixed t.

The same small class-conditional U-Net (same widths; attention at the lowest patched level) is
trained for the same number of steps on the OpenMoji demo set with each parameterisation
(``config.diffusion.parameterization``) and each patch size, through the project's own train step
(``pdm_jax.training.step.jit_train_step``: hybrid loss, the x0-space sqrt(SNR) weighting for
every parameterisation, EMA). Each model is then scored by the unweighted x0 MSE of its EMA
weights, E||x0 - x0_hat(z_t, t)||^2 per pixel, on a fixed set of demo images and fixed noise at
fixed t (``x0_mse``; ``x0_mse_init``: the same for the initial weights, whose zero-initialised
output layer makes x0_hat the parameterisation's zero-output guess). Prints JSON on stdout and
nothing else (data preparation and tables go to stderr).

  python benchmarks/objective_study.py --steps=300 --image_size=32 --batch=32   # ~15 min, 2 CPUs
  python benchmarks/objective_study.py --smoke                                  # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pdm_jax import config_lib, config_validation, sharding  # noqa: E402
from pdm_jax.data import pipeline  # noqa: E402
from pdm_jax.diffusion import losses  # noqa: E402
from pdm_jax.diffusion.schedules import Schedule  # noqa: E402
from pdm_jax.training import state as state_lib  # noqa: E402
from pdm_jax.training import step as step_lib  # noqa: E402


def demo_config(parameterization: str, patch: int, args: argparse.Namespace):
    """configs/demo.py as one expert over the whole chain, shrunk to the study's size."""
    c = config_lib.load_config(REPO / "configs" / "demo.py", "experts=1")
    c.data.image_size = c.model.image_size = args.image_size
    if args.data_dir:
        c.data.data_dir = args.data_dir
    c.model.patch_size = patch
    c.model.model_channels = args.channels
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (args.image_size // patch // 2,)
    c.model.num_head_channels = args.channels
    # The study compares denoising MSE: the variance head and its VLB term are not needed.
    c.model.learn_sigma = False
    if args.smoke:  # The smallest U-Net that compiles in seconds: tests only check the plumbing.
        c.model.update(channel_mult=(1,), attention_resolutions=(), num_groups=8)
    c.diffusion.parameterization = parameterization
    c.optim.lr = args.lr
    c.optim.warmup_steps = min(50, args.steps // 4)
    c.train.num_steps = args.steps
    c.train.batch_size = args.batch
    c.train.ema_decay = args.ema
    c.mesh.shape = (-1, 1)
    config_validation.validate(c, "train")
    return c


def eval_batch(config, n: int) -> dict[str, np.ndarray]:
    """n fixed demo images (no flip, seed 1234: a different order than training's seed 0)."""
    data = dict(config.data.to_dict(), random_flip=False)
    ds = pipeline.make_train_dataset(data, global_batch_size=n, seed=1234, process_index=0,
                                     process_count=1)
    return next(pipeline.iterate_numpy(ds))


def train_and_score(config, eval_data: dict, eval_t: list[int]) -> dict:
    """Trains one model with the project's train step; returns its EMA x0 MSE per eval t (and
    that of the initial weights)."""
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    schedule = Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)
    (setup,) = state_lib.setup_experts(config, mesh)
    state = {setup.name: setup.create_state()}
    step_fn = step_lib.jit_train_step(config, [setup], schedule, mesh)

    @jax.jit
    def x0_mse(params, x0, noise, t, y):
        z = losses.q_sample(schedule, x0, t, noise)
        mean_out, _ = nnx.merge(setup.graphdef, params)(z, t, y)
        x0_hat = losses.predict_x0(schedule, mean_out, z, t, config.diffusion.parameterization)
        return jnp.mean((x0 - x0_hat) ** 2)

    x0 = jnp.asarray(eval_data["image"])
    y = jnp.asarray(eval_data["label"]) if setup.expert.model.num_classes else None
    noise = jax.random.normal(jax.random.PRNGKey(7), x0.shape, jnp.float32)

    def score(params) -> dict[str, float]:
        return {str(t): float(x0_mse(params, x0, noise, jnp.full((x0.shape[0],), t, jnp.int32),
                                     y))
                for t in eval_t}

    init_mse = score(state[setup.name]["ema"])  # before the first step donates the state
    with contextlib.redirect_stdout(sys.stderr):  # tfds may prepare the demo set here
        batches = pipeline.iterate_numpy(pipeline.make_train_dataset(
            config.data, global_batch_size=config.train.batch_size, seed=config.seed,
            process_index=0, process_count=1))
    start = time.perf_counter()
    losses_seen = []
    for _ in range(config.train.num_steps):
        batch = next(batches)
        state, metrics = step_fn(state, sharding.global_batch(
            {k: batch[k] for k in ("image", "label")}, mesh))
        losses_seen.append(metrics["loss"])
    final_loss = float(np.mean(jax.device_get(losses_seen[-20:])))
    train_s = time.perf_counter() - start
    return {"x0_mse": score(state[setup.name]["ema"]), "x0_mse_init": init_mse,
            "train_s": train_s, "final_train_loss": final_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--patch_sizes", default="1,4")
    parser.add_argument("--parameterizations", default="x0,eps,v")
    parser.add_argument("--eval_t", default="50,200,400,600,800")
    parser.add_argument("--eval_images", type=int, default=256)
    parser.add_argument("--data_dir", default="", help="tfds data dir holding pdm_emoji_demo")
    parser.add_argument("--smoke", action="store_true", help="8x8, one tiny model, 2 steps")
    parser.add_argument("--cache_dir", default="", help="persistent XLA compilation cache")
    args = parser.parse_args()
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.smoke:
        args.steps, args.image_size, args.batch, args.eval_images = 2, 8, 8, 8
        args.channels, args.patch_sizes, args.parameterizations = 16, "4", "v"
        args.eval_t = "100,800"
    parameterizations = args.parameterizations.split(",")
    for p in parameterizations:
        if p not in losses.PARAMETERIZATIONS:
            raise ValueError(f"--parameterizations has {p!r}; expected a subset of "
                             f"{losses.PARAMETERIZATIONS}.")
    patch_sizes = [int(p) for p in args.patch_sizes.split(",")]
    eval_t = [int(t) for t in args.eval_t.split(",")]
    if any(not 0 <= t < 1000 for t in eval_t):
        raise ValueError(f"--eval_t={args.eval_t}: every t must lie in [0, 999].")
    # stdout carries the JSON only: tfds prints "Downloading and preparing dataset ..." there
    # when it builds the demo set on first use.
    with contextlib.redirect_stdout(sys.stderr):
        configs = {(p, q): demo_config(q, p, args) for p in patch_sizes
                   for q in parameterizations}
        eval_data = eval_batch(next(iter(configs.values())), args.eval_images)
    results = []
    for (patch, parameterization), config in configs.items():
        row = {"patch_size": patch, "parameterization": parameterization,
               **train_and_score(config, eval_data, eval_t)}
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"{'P':>2} {'param':>5} " + " ".join(f"t={t:>4}" for t in eval_t) + "  train_s",
          file=sys.stderr)
    for r in results:
        print(f"{r['patch_size']:>2} {r['parameterization']:>5} "
              + " ".join(f"{r['x0_mse'][str(t)]:6.4f}" for t in eval_t)
              + f"  {r['train_s']:6.0f}", file=sys.stderr)
    print(json.dumps({"device": jax.devices()[0].device_kind, "steps": args.steps,
                      "image_size": args.image_size, "batch": args.batch,
                      "channels": args.channels, "eval_t": eval_t,
                      "eval_images": args.eval_images, "results": results}, indent=1))


if __name__ == "__main__":
    main()
