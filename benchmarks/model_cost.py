"""Cost of PDM U-Nets per patch size: params, GMACs, XLA FLOPs, memory, time, MFU. Prints JSON.

Runs on CPU, GPU or TPU. Examples:
  python benchmarks/model_cost.py --preset=imagenet256 --patch_sizes=4 --batch=64 --dtype=bfloat16
  python benchmarks/model_cost.py --preset=tiny --patch_sizes=1,2,4 --batch=8     # CPU
  # side by side (same widths): P=4 at 64x64, P=1 at 16x16 (same patched size), P=1 at 64x64
  python benchmarks/model_cost.py --preset=tiny --specs=4@64,1@16,1@64 --batch=8
  python benchmarks/model_cost.py --smoke                                          # seconds
``--specs`` lists P@R (patch P at resolution R); every pair "P@R vs 1@(R/P)" (the paper's
same-cost claim) and "1@R vs P@R" found among them is reported under "comparisons" as ratios.
Timings: median of --iters runs after --warmup runs, each ended by block_until_ready.
MFU = analytic train FLOPs (6 x forward MACs x batch: forward + backward, 2 FLOPs per MAC) /
step time / --peak_tflops (default: looked up by chip). XLA's own count is reported too, but it
misses convolutions lowered to library calls (cuDNN on GPU), so it is not used for MFU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from pdm_jax.diffusion.losses import q_sample, training_losses  # noqa: E402
from pdm_jax.diffusion.schedules import Schedule  # noqa: E402
from pdm_jax.models.flops import count_macs  # noqa: E402
from pdm_jax.models.unet import UNet, UNetConfig  # noqa: E402

# Dense bf16 peak TFLOP/s per chip (SPEC section 11 and vendor sheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}

PRESETS = {
    # The ImageNet-256 expert architecture (SPEC 3); patch size varies, widths fixed.
    "imagenet256": dict(image_size=256, model_channels=256, channel_mult=(1, 2, 2, 2),
                        num_res_blocks=3, num_classes=1000),
    "lsun256": dict(image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2),
                    num_res_blocks=2),
    "tiny": dict(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), num_head_channels=32, num_classes=10),
    # Compiles in seconds on CPU: for the tests that keep this script from rotting.
    "micro": dict(image_size=16, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                  attention_resolutions=(), num_head_channels=16, num_groups=8, num_classes=4),
}


def peak_tflops(override: float | None, chip: str = "") -> float | None:
    """Peak dense bf16 TFLOP/s: the override, else the named chip, else the device's kind."""
    if override:
        return override
    if chip:
        if chip not in PEAK_TFLOPS:
            raise ValueError(f"--chip={chip!r}; known chips: {sorted(PEAK_TFLOPS)}.")
        return PEAK_TFLOPS[chip]
    kind = jax.devices()[0].device_kind
    for name, value in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return value
    return None


def timed(fn, *args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config: UNetConfig, batch: int, warmup: int, iters: int, peak: float | None) -> dict:
    model = UNet(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = optax.adam(1e-4)
    opt_state = tx.init(params)
    schedule = Schedule.from_name("linear")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (batch, config.image_size, config.image_size, 3)),
                    jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    y = jnp.asarray(rng.integers(0, config.num_classes, batch), jnp.int32) \
        if config.num_classes else None

    def forward(params, x, t, y):
        return nnx.merge(graphdef, params)(x, t, y)

    def train_step(params, opt_state, x, t, y):
        noise = jax.random.normal(jax.random.PRNGKey(0), x.shape)
        x_t = q_sample(schedule, x, t, noise)

        def loss_fn(p):
            mean, v = nnx.merge(graphdef, p)(x_t, t, y)
            return training_losses(schedule, mean, v, x, noise, t)["loss"].mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    fwd = jax.jit(forward).lower(params, x, t, y).compile()
    step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, x, t, y).compile()
    step_flops = _xla_flops(step)
    fwd_flops = _xla_flops(fwd)
    memory = step.memory_analysis()
    peak_bytes = None
    if memory is not None:
        peak_bytes = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                         + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    fwd_time = timed(fwd, params, x, t, y, warmup=warmup, iters=iters)

    state = [params, opt_state]

    def run_step():
        state[0], state[1], loss = step(state[0], state[1], x, t, y)
        return loss

    step_time = timed(run_step, warmup=warmup, iters=iters)
    macs = count_macs(forward, params, x[:1], t[:1], None if y is None else y[:1])
    result = {
        "patch_size": config.patch_size, "image_size": config.image_size,
        "patched_size": config.patched_size, "dtype": config.dtype, "batch": batch,
        "params": int(sum(np.size(a) for a in jax.tree.leaves(params))),
        "gmacs_per_forward_per_image": macs / 1e9,
        "xla_gflops_per_forward": None if fwd_flops is None else fwd_flops / 1e9,
        "xla_gflops_per_train_step": None if step_flops is None else step_flops / 1e9,
        "analytic_gflops_per_forward": 2.0 * macs * batch / 1e9,
        "peak_memory_gib": None if peak_bytes is None else peak_bytes / 2**30,
        "forward_ms": fwd_time * 1e3, "train_step_ms": step_time * 1e3,
        "train_images_per_s": batch / step_time, "forward_images_per_s": batch / fwd_time,
    }
    train_flops = 6.0 * macs * batch
    result["analytic_tflops_per_train_step"] = train_flops / 1e12
    result["achieved_tflops"] = train_flops / step_time / 1e12
    if peak:
        result["mfu_train"] = train_flops / step_time / (peak * 1e12)
        result["mfu_forward"] = 2.0 * macs * batch / fwd_time / (peak * 1e12)
    return result


def _xla_flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device program
        analysis = analysis[0] if analysis else None
    return (analysis or {}).get("flops")


def parse_specs(args: argparse.Namespace, image_size: int) -> list[tuple[int, int]]:
    """(patch, resolution) pairs from --specs 'P@R,...' or --patch_sizes at one resolution."""
    if not args.specs:
        return [(int(p), image_size) for p in args.patch_sizes.split(",")]
    specs = []
    for item in args.specs.split(","):
        patch, _, res = item.partition("@")
        if not (patch.isdigit() and res.isdigit()) or int(res) % int(patch):
            raise ValueError(f"--specs item {item!r}: expected P@R with P dividing R, "
                             f"e.g. 4@64.")
        specs.append((int(patch), int(res)))
    return specs


def comparisons(results: list[dict]) -> list[dict]:
    """Cost ratios for "P@R vs 1@(R/P)" (same patched size) and "1@R vs P@R" (same image)."""
    by_spec = {(r["patch_size"], r["image_size"]): r for r in results}
    keys = ("gmacs_per_forward_per_image", "forward_ms", "train_step_ms", "peak_memory_gib",
            "params")
    out = []
    for (p, res), r in by_spec.items():
        if p == 1:
            continue
        for other, kind in (((1, res // p), "same patched size"), ((1, res), "same image size")):
            if other in by_spec:
                o = by_spec[other]
                a, b = (r, o) if kind == "same patched size" else (o, r)
                out.append({"a": f"{a['patch_size']}@{a['image_size']}",
                            "b": f"{b['patch_size']}@{b['image_size']}", "kind": kind,
                            **{f"{k}_ratio_a_over_b": (a[k] / b[k] if a[k] and b[k] else None)
                               for k in keys}})
    return out


def print_table(results: list[dict], comps: list[dict]) -> None:
    print(f"{'P@R':>7} {'params':>9} {'GMAC/img':>9} {'fwd ms':>8} {'step ms':>8} "
          f"{'img/s':>8} {'MFU':>6} {'mem GiB':>8}", file=sys.stderr)
    for r in results:
        mfu = f"{100 * r['mfu_train']:.1f}%" if "mfu_train" in r else "-"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.3f}"
        print(f"{r['patch_size']:>3}@{r['image_size']:<3} {r['params'] / 1e6:8.2f}M "
              f"{r['gmacs_per_forward_per_image']:9.3f} {r['forward_ms']:8.1f} "
              f"{r['train_step_ms']:8.1f} {r['train_images_per_s']:8.1f} {mfu:>6} {mem:>8}",
              file=sys.stderr)
    for c in comps:
        print(f"{c['a']} / {c['b']} ({c['kind']}): MACs x{c['gmacs_per_forward_per_image_ratio_a_over_b']:.2f}, "
              f"forward x{c['forward_ms_ratio_a_over_b']:.2f}, "
              f"train step x{c['train_step_ms_ratio_a_over_b']:.2f}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--patch_sizes", default="1,2,4")
    parser.add_argument("--specs", default="", help="P@R list, e.g. 4@64,1@16,1@64 "
                        "(overrides --patch_sizes and --image_size)")
    parser.add_argument("--model_channels", type=int, default=0, help="0: the preset's")
    parser.add_argument("--channel_mult", default="", help="e.g. 1,2 (empty: the preset's)")
    parser.add_argument("--num_res_blocks", type=int, default=0, help="0: the preset's")
    parser.add_argument("--chip", default="", help=f"peak FLOP/s of one of {sorted(PEAK_TFLOPS)}")
    parser.add_argument("--smoke", action="store_true", help="micro preset, one timed run")
    parser.add_argument("--image_size", type=int, default=None, help="override the preset's")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak_tflops", type=float, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.batch, args.warmup, args.iters = "micro", 2, 1, 1
        args.specs = args.specs or "2@8,1@4"
    preset = dict(PRESETS[args.preset])
    for key in ("model_channels", "num_res_blocks"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    if args.channel_mult:
        preset["channel_mult"] = tuple(int(m) for m in args.channel_mult.split(","))
    peak = peak_tflops(args.peak_tflops, args.chip)
    results = []
    for p, image_size in parse_specs(args, args.image_size or preset["image_size"]):
        patched = image_size // p
        levels = len(preset["channel_mult"])
        attention = tuple(r for r in preset.get("attention_resolutions", (16, 8))
                          if r in [patched // 2**i for i in range(levels)])
        config = UNetConfig(**{**preset, "attention_resolutions": attention,
                               "image_size": image_size}, patch_size=p, dtype=args.dtype)
        config.validate()
        results.append(measure(config, args.batch, args.warmup, args.iters, peak))
        print(json.dumps(results[-1]), file=sys.stderr)
    comps = comparisons(results)
    print_table(results, comps)
    print(json.dumps({"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
                      "preset": args.preset, "peak_tflops": peak, "results": results,
                      "comparisons": comps}, indent=1))

if __name__ == "__main__":
    main()
