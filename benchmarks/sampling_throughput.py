"""Sampling throughput of the ImageNet-256 ensemble: images/s for a 250-step guided chain.

Builds the two-expert ensemble of configs/imagenet256.py (split at SNR 0.25: 99 low-noise and
151 high-noise steps of the 250) in three variants with the same widths per expert:
  unpatched  both experts P=1
  patched    both experts P=4 (the released recipe, recipe=paper)
  project    the config's own recipe (P=1 low noise, P=4 high noise; widths as configured)
and times the project's jitted sampler (``samplers.sample_loop`` with expert dispatch and
classifier-free guidance, one 2B forward per step) on ``--time_steps`` consecutive steps inside
each expert's part of the chain. The 250-step time is EXTRAPOLATED:
  t_250 = sum_e steps_e * (time of k steps of expert e) / k,   images/s = batch / t_250.
Weights are random (throughput does not depend on their values). Prints JSON (table on stderr).

  python benchmarks/sampling_throughput.py --batch=64 --dtype=bfloat16          # accelerator
  python benchmarks/sampling_throughput.py --image_size=64 --model_channels=32 \\
      --channel_mult=1,2 --num_res_blocks=1 --batch=4 --time_steps=2           # CPU, same layout
  python benchmarks/sampling_throughput.py --smoke                              # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pdm_jax import config_lib  # noqa: E402
from pdm_jax.diffusion import samplers  # noqa: E402
from pdm_jax.diffusion.experts import dispatching_model_fn, experts_from_config  # noqa: E402
from pdm_jax.diffusion.schedules import Schedule, expert_index_for_steps  # noqa: E402
from pdm_jax.models.unet import UNet  # noqa: E402
from pdm_jax.training.state import model_graphdef  # noqa: E402

VARIANTS = ("unpatched", "patched", "project")


def imagenet_config(variant: str, args: argparse.Namespace):
    """configs/imagenet256.py for a variant, with the CPU overrides of ``args`` on every expert."""
    c = config_lib.load_config(REPO / "configs" / "imagenet256.py",
                               "recipe=project" if variant == "project" else "recipe=paper")
    c.model.image_size = c.data.image_size = args.image_size
    c.model.dtype = args.dtype
    experts = [dict(e) for e in c.experts]
    for e in experts:
        model = dict(e.get("model", {}))
        if variant == "unpatched":
            model["patch_size"] = 1
        for key in ("model_channels", "num_res_blocks", "num_groups", "num_head_channels"):
            if getattr(args, key):
                model[key] = getattr(args, key)
        if args.channel_mult:
            model["channel_mult"] = tuple(int(m) for m in args.channel_mult.split(","))
        if args.attention_resolutions is not None:
            model["attention_resolutions"] = tuple(
                int(r) for r in args.attention_resolutions.split(",") if r)
        # Keep attention only at resolutions the patched U-Net has (as model_cost.py does).
        p = model.get("patch_size", c.model.patch_size)
        mult = model.get("channel_mult", c.model.channel_mult)
        levels = [args.image_size // p // 2**i for i in range(len(mult))]
        model["attention_resolutions"] = tuple(
            r for r in model.get("attention_resolutions", c.model.attention_resolutions)
            if r in levels)
        e["model"] = model
        e.pop("warm_start", None)
    c.experts = experts
    return c


def random_params(model_config, seed: int) -> dict:
    """Small random weights filled from numpy into the abstract shapes (no init to compile)."""
    abstract = nnx.to_pure_dict(nnx.state(
        nnx.eval_shape(lambda: UNet(model_config, rngs=nnx.Rngs(0))), nnx.Param))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.02, a.shape), a.dtype), abstract)


def sub_schedule(schedule: Schedule, indices: np.ndarray) -> Schedule:
    """The chain restricted to ``indices`` (every table sliced; original t kept for dispatch)."""
    return Schedule(**{f.name: getattr(schedule, f.name)[indices]
                       for f in dataclasses.fields(Schedule)})


def measure_variant(variant: str, args: argparse.Namespace) -> dict:
    config = imagenet_config(variant, args)
    experts = experts_from_config(config)
    full = Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)
    chain = full.respace(str(args.steps))
    owners = expert_index_for_steps(chain, [e.snr_interval for e in experts])
    graphdefs = [model_graphdef(e.model) for e in experts]
    params = [random_params(e.model, e.index) for e in experts]
    unet = experts[0].model
    shape = (args.batch, unet.image_size, unet.image_size, unet.in_channels)
    labels = jnp.asarray(np.arange(args.batch) % unet.num_classes, jnp.int32)
    per_expert = []
    for expert in experts:
        idx = np.nonzero(owners == expert.index)[0]
        k = min(args.time_steps, len(idx))
        # k consecutive steps in the middle of the expert's part of the chain.
        start = idx[len(idx) // 2 - k // 2]
        sub = sub_schedule(chain, np.arange(start, start + k))

        def sample(params, rng, labels, sub=sub):
            # As pdm_jax.sampling: each expert's graph is merged inside its lax.switch branch.
            model_fns = [lambda x, t, y, g=g, p=p: nnx.merge(g, p)(x, t, y)
                         for g, p in zip(graphdefs, params)]
            model_fn = dispatching_model_fn(experts, model_fns, full)
            return samplers.sample_loop(
                model_fn, rng, shape, sub, sampler="ddpm",
                parameterization=config.diffusion.parameterization, labels=labels,
                null_label=unet.num_classes, guidance_scale=args.guidance_scale,
                learn_sigma=unet.learn_sigma)

        fn = jax.jit(sample)
        key = jax.random.PRNGKey(0)
        start_c = time.perf_counter()
        compiled = fn.lower(params, key, labels).compile()
        compile_s = time.perf_counter() - start_c
        for _ in range(args.warmup):
            jax.block_until_ready(compiled(params, key, labels))
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, key, labels))
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times) / k
        per_expert.append({"expert": expert.index, "patch_size": expert.model.patch_size,
                           "snr_interval": list(expert.snr_interval),
                           "chain_steps": int(len(idx)), "timed_steps": k,
                           "step_ms": step_s * 1e3, "compile_s": compile_s})
    total = sum(e["chain_steps"] * e["step_ms"] / 1e3 for e in per_expert)
    return {"variant": variant, "experts": per_expert, "steps": args.steps,
            "seconds_per_batch_extrapolated": total, "images_per_s": args.batch / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=250, help="chain length extrapolated to")
    parser.add_argument("--time_steps", type=int, default=4, help="steps timed per expert")
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--model_channels", type=int, default=0, help="0: the config's")
    parser.add_argument("--channel_mult", default="", help="e.g. 1,2 (empty: the config's)")
    parser.add_argument("--num_res_blocks", type=int, default=0)
    parser.add_argument("--num_groups", type=int, default=0)
    parser.add_argument("--num_head_channels", type=int, default=0)
    parser.add_argument("--attention_resolutions", default=None, help="e.g. 8 or '' for none")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="16x16 micro U-Nets, for tests")
    args = parser.parse_args()
    if args.smoke:
        args.image_size, args.batch, args.time_steps, args.iters = 16, 2, 2, 1
        args.model_channels, args.channel_mult, args.num_res_blocks = 16, "1", 1
        args.num_groups, args.num_head_channels, args.attention_resolutions = 8, 16, ""
        args.variants = "patched"
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        raise ValueError(f"--variants has {unknown}; expected a subset of {VARIANTS}.")
    # A sliced chain needs 2 steps: the sampler's tables look at index 1.
    if args.time_steps < 2 or args.batch < 1:
        raise ValueError(f"--time_steps={args.time_steps} must be >= 2 and --batch={args.batch} "
                         f">= 1.")
    results = []
    for variant in variants:
        results.append(measure_variant(variant, args))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"{'variant':>10} {'patches':>8} {'ms/step (per expert)':>22} {'s/batch':>8} "
          f"{'img/s':>8}", file=sys.stderr)
    for r in results:
        print(f"{r['variant']:>10} {'/'.join(str(e['patch_size']) for e in r['experts']):>8} "
              f"{'/'.join('%.1f' % e['step_ms'] for e in r['experts']):>22} "
              f"{r['seconds_per_batch_extrapolated']:8.2f} {r['images_per_s']:8.3f}",
              file=sys.stderr)
    print(json.dumps({"device": jax.devices()[0].device_kind, "batch": args.batch,
                      "image_size": args.image_size, "guidance_scale": args.guidance_scale,
                      "extrapolated": f"{args.time_steps} timed steps per expert -> "
                                      f"{args.steps} steps", "results": results}, indent=1))


if __name__ == "__main__":
    main()
