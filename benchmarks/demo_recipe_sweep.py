"""Demo recipe sweep: which configs/demo.py recipe draws recognisable emoji soonest?

Trains named recipes (overrides of configs/demo.py) on the demo images with the project's own
train step (``pdm_jax.training.step``) and sampler (``pdm_jax.sampling``), and samples a small
fixed-seed grid at each snapshot step. Writes one contact sheet (a row per recipe, a column per
snapshot), each grid's PNG, and prints JSON: per recipe the loss curve, steps/s and compile time
(stdout carries that JSON only; logs go to stderr and to each recipe's .log).

The images come from an .npz written once by ``--dump_data`` (needs TensorFlow and tfds), so the
sweep itself needs only JAX, Flax, optax and ml-collections (it runs on accelerator machines with
no TensorFlow). Each recipe runs in its own process; ``--parallel`` runs several at once.

  python benchmarks/demo_recipe_sweep.py --dump_data=/tmp/demo64.npz
  python benchmarks/demo_recipe_sweep.py --data=/tmp/demo64.npz --out=/tmp/sweep \
      --recipes=default,v --steps=1000 --snapshots=250,500,1000
  python benchmarks/demo_recipe_sweep.py --smoke     # 16x16, a few steps: checks the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Overrides of configs/demo.py (applied with ConfigDict.update per section), each stated in full
# so a recipe means what it meant when it was measured (benchmarks/RESULTS.md), whatever the
# shipped defaults become. "demo" is the shipped recipe; "two_expert_x0" the one it replaced.
# The 64x64 demo U-Net the first two rounds were measured with (configs/demo.py until
# 2026-12-02); every recipe states its architecture in full.
# Rounds 1 and 2 trained on the full demo set (8 classes; dump it with
# --dump_name=pdm_emoji_demo), round 3 on the curated subset (6 classes) the demo uses now.
_DEMO64 = dict(image_size=64, patch_size=4, model_channels=64, channel_mult=(1, 2, 2),
               num_res_blocks=1, attention_resolutions=(8, 4), num_head_channels=64,
               num_groups=32, num_classes=8)


def _recipe(experts=1, param="x0", weighting="sqrt_snr", lr=1e-3, batch=32, learn_sigma=False,
            ema=0.99, warmup=100, **model):
    model = dict(_DEMO64, learn_sigma=learn_sigma, **model)
    return dict(arg=f"experts={experts}", optim=dict(lr=lr, warmup_steps=warmup),
                train=dict(batch_size=batch, ema_decay=ema),
                data=dict(image_size=model["image_size"]), model=model,
                diffusion=dict(parameterization=param, weighting=weighting))


# Third round (2-core CPU, 10-minute budget): smaller images and token grids, curated data.
_D32 = dict(image_size=32, channel_mult=(1, 2, 2), num_classes=6)


# Images in each snapshot grid (one sampling batch).
NUM_GRID = 16
_CH32 = dict(model_channels=32, num_head_channels=32, num_groups=8)
RECIPES: dict[str, dict] = {
    "demo": {},
    # First round: parameterisation and learning rate (batch 32, 64 channels).
    "two_expert_x0": _recipe(experts=2, lr=3e-4, learn_sigma=True),
    "x0_lr1e3": _recipe(),
    "v": _recipe(param="v", weighting="snr+1"),
    "v_lr2e3": _recipe(param="v", weighting="snr+1", lr=2e-3),
    "v_b16": _recipe(param="v", weighting="snr+1", batch=16),
    "eps": _recipe(param="eps", weighting="snr"),
    "v_2experts": _recipe(experts=2, param="v", weighting="snr+1"),
    "v_ch32": _recipe(param="v", weighting="snr+1", **_CH32),
    "v_ch96": _recipe(param="v", weighting="snr+1", model_channels=96, channel_mult=(1, 2),
                      num_head_channels=32, attention_resolutions=(8,)),
    # Second round: x0 only, cheaper steps for a 2-core CPU.
    "x0_b16": _recipe(batch=16),
    "x0_b16_lr2e3": _recipe(batch=16, lr=2e-3),
    "x0_b8": _recipe(batch=8),
    "x0_b16_sigma": _recipe(batch=16, learn_sigma=True),
    "x0_b16_ema995": _recipe(batch=16, ema=0.995),
    "x0_2experts_b16": _recipe(experts=2, batch=16),
    "x0_ch32_lr2e3": _recipe(lr=2e-3, **_CH32),
    "x0_ch32_b16_lr2e3": _recipe(batch=16, lr=2e-3, **_CH32),
    "x0_ch48_b16": _recipe(batch=16, model_channels=48, num_head_channels=48, num_groups=16),
    "d32_p2": _recipe(batch=16, lr=2e-3, patch_size=2, attention_resolutions=(8, 4), **_D32),
    "d32_p4": _recipe(batch=16, lr=2e-3, patch_size=4, attention_resolutions=(4, 2), **_D32),
    "d32_p4_b32": _recipe(batch=32, lr=2e-3, patch_size=4, attention_resolutions=(4, 2),
                          **_D32),
    "d32_p4_w96": _recipe(batch=16, lr=2e-3, patch_size=4, attention_resolutions=(4, 2),
                          model_channels=96, num_head_channels=32, **_D32),
    "d48_p4": _recipe(batch=16, lr=2e-3, patch_size=4, attention_resolutions=(6, 3),
                      image_size=48, channel_mult=(1, 2, 2)),
}


def demo_config(arg: str = ""):
    """``configs/demo.py``'s get_config(arg)."""
    from pdm_jax import config_lib
    return config_lib.load_config(REPO / "configs" / "demo.py", arg)


def recipe_config(name: str, smoke: bool):
    """configs/demo.py with recipe ``name``'s overrides (smoke: the 16x16 test size)."""
    from pdm_jax import config_validation
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; known: {sorted(RECIPES)}")
    recipe = dict(RECIPES[name])
    arg = ",".join(filter(None, [recipe.pop("arg", ""), "smoke" if smoke else ""]))
    config = demo_config(arg)
    for section, overrides in recipe.items():
        if smoke and section in ("model", "data"):  # the smoke size keeps its 16x16 U-Net
            overrides = {k: v for k, v in overrides.items() if k == "learn_sigma"}
        if smoke and section == "optim":  # and its 2-step warmup (4 steps are all it runs)
            overrides = {k: v for k, v in overrides.items() if k != "warmup_steps"}
        config[section].update(overrides)
    if smoke:  # A micro U-Net that compiles in seconds: the smoke run checks the plumbing only.
        config.model.update(model_channels=16, channel_mult=(1,), attention_resolutions=(),
                            num_head_channels=16, num_groups=8)
        for expert in config.experts:
            expert.get("model", {}).pop("channel_mult", None)
    config.mesh.shape = (-1, 1)
    # The checks every mode shares (values, experts, schedule, sampler). Not mode "train": that
    # also checks the tfds dataset, which the sweep never reads (its images come from an .npz,
    # so it runs without TensorFlow).
    config_validation.validate(config, "summary")
    import jax
    for what, size in (("train.batch_size", config.train.batch_size), ("grid", NUM_GRID)):
        if size % jax.device_count():
            raise ValueError(f"Recipe {name!r}: {what}={size} is not a multiple of the "
                             f"{jax.device_count()} devices.")
    return config


def dump_data(path: str, image_size: int, name: str) -> None:
    """Writes every image of a demo set once (uint8 NHWC, int32 labels) through the pipeline."""
    from pdm_jax.evaluation import floor
    data = dict(demo_config().data.to_dict(), image_size=image_size,
                **({"name": name} if name else {}))
    pixels, labels = floor.distinct_images(data, seed=0, limit=10**9)
    np.savez_compressed(path, images=pixels, labels=labels)
    print(json.dumps({"wrote": path, "images": len(pixels)}))


def run_recipe(name: str, data_path: str, steps: int, snapshots: list[int], out: str,
               grid_steps: str, guidance: float, smoke: bool, deadline: float) -> dict:
    """Trains one recipe, sampling a grid at each snapshot; returns its measurements."""
    import jax
    from pdm_jax import io as io_lib
    from pdm_jax import sampling, sharding
    from pdm_jax.diffusion.schedules import Schedule
    from pdm_jax.training.state import setup_experts
    from pdm_jax.training.step import jit_train_step

    config = recipe_config(name, smoke)
    data = np.load(data_path)
    size = config.data.image_size
    pixels = data["images"]
    if pixels.shape[1] != size:
        pixels = np.asarray(jax.image.resize(pixels.astype(np.float32),
                                             (len(pixels), size, size, 3), "area"))
    pixels = pixels.astype(np.float32) / 127.5 - 1.0
    labels = data["labels"]

    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    schedule = Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)
    setups = setup_experts(config, mesh)  # every expert, seeded config.seed + index
    state = {s.name: s.create_state() for s in setups}
    step_fn = jit_train_step(config, setups, schedule, mesh)
    num_grid = NUM_GRID
    sample_fn = sampling.make_sample_fn(config, mesh, steps=grid_steps, sampler="ddpm", eta=0.0,
                                        guidance_scale=guidance, batch_size=num_grid)
    rng = np.random.default_rng(config.seed)
    batch_size = config.train.batch_size

    def next_batch():
        idx = rng.integers(0, len(pixels), batch_size)
        flip = rng.random(batch_size) < 0.5
        x = np.where(flip[:, None, None, None], pixels[idx, :, ::-1], pixels[idx])
        return sharding.global_batch({"image": x, "label": labels[idx]}, mesh)

    losses, grids, started = [], {}, time.perf_counter()
    compile_s = train_s = 0.0
    trained = 0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, next_batch())
        if step == 1:
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - t0
            t_train = time.perf_counter()
        trained = step
        if step % 25 == 0:
            losses.append([step, float(metrics["loss"])])
        if step in snapshots or step == steps:
            jax.block_until_ready(state)
            train_s += time.perf_counter() - t_train
        if step in snapshots:
            ema = [state[s.name]["ema"] for s in setups]
            images, _ = sampling.sample_images(sample_fn, ema, num=num_grid, batch_size=num_grid,
                                               seed=0, num_classes=config.model.num_classes)
            path = os.path.join(out, f"{name}_{step:05d}.png")
            io_lib.save_png(path, io_lib.image_grid(images), min_size=0)
            grids[step] = path
            if time.time() > deadline:  # keep what is done rather than lose it to a timeout
                break
            t_train = time.perf_counter()
    return {"recipe": name, "overrides": RECIPES[name], "steps": trained,
            "batch_size": batch_size, "compile_s": round(compile_s, 1),
            "train_steps_per_s": round((trained - 1) / max(train_s, 1e-9), 2),
            "wall_s": round(time.perf_counter() - started, 1), "loss": losses,
            "grids": grids, "device": jax.devices()[0].device_kind}


def contact_sheet(results: list[dict], path: str) -> None:
    """One PNG: a row per recipe, a column per snapshot (grids as written), labelled."""
    from PIL import Image, ImageDraw
    rows = [(r["recipe"], sorted(r["grids"].items(), key=lambda kv: int(kv[0])))
            for r in results if r["grids"]]
    first = Image.open(rows[0][1][0][1])
    w, h = first.size
    cols = max(len(g) for _, g in rows)
    label_w, label_h = 110, 14
    sheet = Image.new("RGB", (label_w + cols * (w + 4), label_h + len(rows) * (h + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (step, _) in enumerate(rows[0][1]):
        draw.text((label_w + j * (w + 4), 0), f"step {step}", fill="black")
    for i, (name, grids) in enumerate(rows):
        y = label_h + i * (h + 4)
        draw.text((2, y + h // 2), name, fill="black")
        for j, (_, grid_path) in enumerate(grids):
            sheet.paste(Image.open(grid_path), (label_w + j * (w + 4), y))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump_data", default="", help="write the demo images to this .npz")
    parser.add_argument("--dump_name", default="",
                        help="data.name to dump (default: configs/demo.py's, the curated set)")
    parser.add_argument("--data", default="", help=".npz from --dump_data")
    parser.add_argument("--out", default="/tmp/demo_recipe_sweep")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--snapshots", default="250,500,1000,2000")
    parser.add_argument("--grid_steps", default="100", help="DDPM respacing of the grids")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--parallel", type=int, default=1, help="recipes run at once")
    parser.add_argument("--smoke", action="store_true", help="16x16, 4 steps (plumbing only)")
    parser.add_argument("--budget_s", type=float, default=0.0,
                        help="stop each recipe at its first snapshot after this many seconds")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # worker: run this recipe
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.dump_data:
        dump_data(args.dump_data, 64, args.dump_name)
        return
    if args.smoke:
        args.steps, args.snapshots, args.grid_steps = 4, "2,4", "3"
    # Empty --snapshots: no grids, only the speed measurement.
    snapshots = sorted(int(s) for s in args.snapshots.split(",") if s and int(s) <= args.steps)
    deadline = args.deadline or (time.time() + args.budget_s if args.budget_s else float("inf"))
    os.makedirs(args.out, exist_ok=True)
    if args.smoke and not args.data:
        args.data = os.path.join(args.out, "smoke_data.npz")
        gen = np.random.default_rng(0)
        np.savez(args.data, images=gen.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
                 labels=gen.integers(0, 8, 64).astype(np.int32))
    if args.one:
        result = run_recipe(args.one, args.data, args.steps, snapshots, args.out,
                            args.grid_steps, args.guidance, args.smoke, deadline)
        with open(os.path.join(args.out, f"{args.one}.json"), "w") as f:
            json.dump(result, f)
        return

    names = [n for n in args.recipes.split(",") if n]
    for name in names:
        recipe_config(name, args.smoke)  # unknown names and bad overrides fail before any work
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            cmd = [sys.executable, __file__, "--one", name, "--data", args.data, "--out",
                   args.out, "--steps", str(args.steps), "--snapshots",
                   ",".join(map(str, snapshots)), "--grid_steps", args.grid_steps,
                   "--guidance", str(args.guidance), "--deadline", str(deadline)]
            cmd += ["--smoke"] if args.smoke else []
            log = open(os.path.join(args.out, f"{name}.log"), "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1.0)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                print(f"{name}: exit {proc.returncode}", file=sys.stderr, flush=True)
    results = []
    for name in names:
        path = os.path.join(args.out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    if any(r["grids"] for r in results):
        contact_sheet(results, os.path.join(args.out, "contact_sheet.png"))
    print(json.dumps({"results": results, "failed": sorted(set(names) - {r["recipe"] for r in
                                                                           results})}))

if __name__ == "__main__":
    main()
