"""The seed's claims at small scale: patch size, training objective, expert split (issue 16).

Trains every variant of the chosen studies (benchmarks/paper_claims_studies.py: patch size P in
1, 2, 4, 8; x0 / eps / v outputs at P=1 and P=4 with their usual and the seed's sqrt(SNR)
weightings; two-expert splits at SNR 0.25 against single P=1 and P=4 models at equal images and
at equal train FLOPs) with the project's jitted train step, samples each with the same sampler
settings, and scores it with the project's evaluator (FID, sFID, precision, recall) against N
data images, next to the data's own floor at the same N (N other data images) and a uniform-
noise baseline. Every variant of a study has the same widths, seed, batch, image count (or FLOPs)
and sampler. Variants two studies share are trained once. Prints JSON (stdout carries only the
JSON; logs go to stderr): per variant its overrides, steps, images seen, train FLOPs, GMACs per
forward, train-step and sampling time, metrics, floor and N; per claim a verdict with its
numbers and rule (the rules: paper_claims_studies.py's docstring).

  python benchmarks/paper_claims.py --smoke      # seconds of training: the tests' plumbing check
  python benchmarks/paper_claims.py --size=cpu --inception_path=$HOME/inception.safetensors \
      --out=/tmp/paper_claims_cpu                 # about an hour on an idle 2-core CPU
  python benchmarks/paper_claims.py --size=gpu --inception_path=... --out=...   # one GPU
  python benchmarks/paper_claims.py --size=cpu --studies=patch --inception_path=... \
      --data.name=folder --data.folder=/path/to/images --data.class_conditional=False

Data: the data section of ``--data_config`` (default configs/demo.py, the OpenMoji demo set) with
``--data.KEY=VALUE`` overrides, at the size preset's image size (``--image_size``). Its distinct
images (up to the preset's limit) are the training set; the first N are the reference, the next
N the floor (N is at most half the data). Class-conditional models sample with the reference's
labels. With ``--out``: the JSON, one sample grid per variant and a plot of FID against
cost (paper_claims.png). ``--smoke`` may run without ``--inception_path`` (random Inception
weights: the numbers then mean nothing).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import paper_claims_studies as studies_lib  # noqa: E402
import paper_claims_train as train_lib  # noqa: E402

# Sizes. images: distinct data images read at most; num: N samples per FID (at most half the
# data); steps: train steps of the equal-images budget; timing_calls: timed sampling calls.
_MICRO = dict(model_channels=16, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
              num_head_channels=16, num_groups=8)
PRESETS = {
    "smoke": dict(image_size=16, batch=8, steps=8, num=16, images=64, sample_steps="3",
                  eval_batch=16, timing_calls=2, lr=1e-3, warmup=1, ema=0.9, model=_MICRO),
    "cpu": dict(image_size=32, batch=32, steps=250, num=128, images=20_000, sample_steps="50",
                eval_batch=64, timing_calls=3, lr=2e-3, warmup=25, ema=0.99,
                model=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(), num_head_channels=32, num_groups=8)),
    "gpu": dict(image_size=64, batch=64, steps=1000, num=900, images=50_000, sample_steps="100",
                eval_batch=100, timing_calls=5, lr=2e-3, warmup=100, ema=0.995,
                model=dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                           attention_resolutions=(), num_head_channels=64, num_groups=32)),
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    """The flags, and the ``--data.KEY=VALUE`` overrides as {KEY: VALUE string}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="--size=smoke")
    parser.add_argument("--studies", default=",".join(studies_lib.STUDIES))
    parser.add_argument("--variants", default="", help="only these (comma list): partial "
                        "reruns and speed checks; claims needing others are inconclusive")
    parser.add_argument("--out", default="", help="directory for the JSON, grids and plot")
    parser.add_argument("--inception_path", default="")
    parser.add_argument("--data_config", default=str(REPO / "configs" / "demo.py"),
                        help="config file[:arg] whose data section is used")
    for key in ("image_size", "batch", "steps", "num", "eval_batch"):
        parser.add_argument(f"--{key}", type=int, default=0, help="0: the size's")
    parser.add_argument("--sample_steps", default="", help="respacing ('' = the size's)")
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rel_tol", type=float, default=0.1,
                        help="relative FID tolerance of the verdicts")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not (key.startswith("--data.") and sep):
            parser.error(f"unrecognised argument {item!r} (only --data.KEY=VALUE overrides)")
        overrides[key[len("--data."):]] = value
    if args.smoke:
        args.size = "smoke"
    for key, value in PRESETS[args.size].items():
        if not getattr(args, key, None):
            setattr(args, key, value)
    args.studies = [s for s in args.studies.split(",") if s]
    for s in args.studies:
        if s not in studies_lib.STUDIES:
            parser.error(f"--studies: unknown study {s!r}; known: {studies_lib.STUDIES}")
    if not args.inception_path and args.size != "smoke":
        parser.error("--inception_path is required (except with --smoke)")
    return args, overrides


def _typed(old: Any, value: str) -> Any:
    """A command-line string as the type of the config value it replaces."""
    if isinstance(old, bool):
        return value.lower() not in ("0", "false", "no", "")
    if isinstance(old, (int, float)):
        return type(old)(value)
    if isinstance(old, (tuple, list)):
        return tuple(ast.literal_eval(value))
    return value


def base_config(args: argparse.Namespace, data_overrides: dict[str, str]):
    """The study's base config: the data section, the size's U-Net, optimiser and sampler."""
    from pdm_jax import config_lib, config_validation
    from pdm_jax.data import datasets

    path, _, arg = args.data_config.partition(":")
    data = config_lib.load_config(path, arg or None).data
    c = config_lib.load_config(REPO / "configs" / "demo.py", "experts=1")
    c.data = data
    for key, value in data_overrides.items():
        if key not in c.data:
            raise ValueError(f"--data.{key}: unknown data key; known: {sorted(c.data)}")
        c.data[key] = _typed(c.data[key], value)
    c.data.image_size = c.model.image_size = args.image_size
    c.seed = args.seed
    c.model.update(args.model, patch_size=1, learn_sigma=False, dropout=0.0, dtype="float32")
    # Classes from the data (an unconditional set trains an unconditional model).
    c.model.num_classes = datasets.check_available(c.data) if c.data.class_conditional else 0
    c.experts = []
    c.optim.update(lr=args.lr, warmup_steps=args.warmup, grad_clip=1.0)
    c.train.update(batch_size=args.batch, num_steps=args.steps, ema_decay=args.ema)
    c.sample.update(sampler=args.sampler, steps=args.sample_steps, eta=0.0, seed=args.seed,
                    guidance_scale=args.guidance_scale, batch_size=args.eval_batch)
    c.mesh.shape = (-1, 1)
    config_validation.validate(c, "train")
    return c


def plot(result: dict[str, Any], path: str) -> None:
    """FID against cost: GMACs per forward (patch, objective studies), train FLOPs (split)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = list(result["studies"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, study in zip(axes[0], panels):
        x_key = "train_tflops" if study == "split" else "gmacs_per_forward"
        for name in result["studies"][study]["variants"]:
            row = result["variants"][name]
            if not isinstance(row["fid"], float):  # a diverged run ("nan" in strict JSON)
                continue
            x = row["train_flops"] / 1e12 if x_key == "train_tflops" else row[x_key]
            marker = "s" if name.endswith("_flops") else "o"
            ax.scatter(x, row["fid"], marker=marker)
            ax.annotate(name, (x, row["fid"]), fontsize=6)
        for label, style in (("floor", "--"), ("noise", ":")):
            ax.axhline(result[label]["fid"], linestyle=style, color="grey", label=f"{label} FID")
        ax.set_xscale("log")
        ax.set_yscale("log")  # the floor sits orders of magnitude below early models
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("train TFLOPs" if x_key == "train_tflops" else "GMACs per forward")
        ax.set_ylabel(f"FID (N={result['num']})")
        ax.set_title(f"{study} study")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def strict_json(value: Any) -> Any:
    """``value`` with inf/NaN floats as strings (strict JSON has neither) and tuples as lists."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else str(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_studies(args: argparse.Namespace, data_overrides: dict[str, str],
                out: str) -> dict[str, Any]:
    """Runs the studies (files under ``out``); returns the strict-JSON result."""
    import jax

    from pdm_jax import sharding
    from pdm_jax.evaluation import floor as floor_lib

    started = time.perf_counter()
    base = base_config(args, data_overrides)
    variants = studies_lib.all_variants(args.studies, smoke=args.size == "smoke")
    if args.variants:
        wanted = args.variants.split(",")
        unknown = sorted(set(wanted) - set(variants))
        if unknown:
            raise ValueError(f"--variants: {unknown} are not in the studies; known: "
                             f"{sorted(variants)}")
        variants = {n: variants[n] for n in wanted}
    mesh = sharding.make_mesh((-1, 1))
    images, labels = floor_lib.distinct_images(base.data, args.seed, args.images)
    num = min(args.num, len(images) // 2)
    print(f"{len(images)} distinct images; N = {num}; {len(variants)} variants",
          file=sys.stderr, flush=True)
    inception_path = args.inception_path or train_lib.random_inception(out)
    ref = floor_lib.data_floor(images, num, inception_path, mesh, args.eval_batch,
                               ref_path=os.path.join(out, "reference.npz"), labels=labels)
    noise = np.random.default_rng(args.seed).integers(0, 256, (num, *images.shape[1:]),
                                                      dtype=np.uint8)
    noise_metrics = floor_lib.images_metrics(ref, noise, mesh, args.eval_batch)

    configs = {name: train_lib.variant_config(base, v) for name, v in variants.items()}
    costs = {name: train_lib.cost(c) for name, c in configs.items()}
    budget_flops = args.steps * train_lib.cost(train_lib.variant_config(
        base, studies_lib.FLOPS_REFERENCE))["flops_per_step"]
    timed = {v.name for v in studies_lib.study_variants("patch", smoke=args.size == "smoke")
             } if "patch" in args.studies else set()
    programs, rows = train_lib.Programs(mesh, ref), {}
    # Variants that sample with the same program run one after the other (they share it).
    order = sorted(variants, key=lambda n: train_lib.sampling_key(configs[n]))
    for name in order:
        variant = variants[name]
        steps = args.steps if variant.budget == "images" else max(
            1, round(budget_flops / costs[name]["flops_per_step"]))
        print(f"== {name}: {steps} steps", file=sys.stderr, flush=True)
        row = train_lib.run_variant(
            configs[name], programs, images, labels, steps=steps,
            timing_calls=args.timing_calls if name in timed else 0,
            grid_path=os.path.join(out, f"{name}.png") if args.out else "")
        rows[name] = {"overrides": variant.overrides(), "budget": variant.budget,
                      **costs[name], "train_flops": steps * costs[name]["flops_per_step"],
                      **row, "floor": ref.floor, "num": num}
        print(json.dumps(strict_json({name: rows[name]})), file=sys.stderr, flush=True)

    result = {"size": args.size, "device": jax.devices()[0].device_kind,
              "num_devices": jax.device_count(), "num": num, "data_images": len(images),
              "data": base.data.to_dict(), "model": base.model.to_dict(),
              "settings": {k: getattr(args, k) for k in (
                  "image_size", "batch", "steps", "lr", "warmup", "ema", "sampler",
                  "sample_steps", "guidance_scale", "eval_batch", "seed", "rel_tol")},
              "budget": {"images": args.steps * args.batch, "flops": budget_flops,
                         "flops_reference": studies_lib.FLOPS_REFERENCE.name},
              "inception": args.inception_path or "random weights (the numbers mean nothing)",
              "floor": ref.floor, "noise": noise_metrics,
              "variants": {n: rows[n] for n in variants}, "studies": {}}
    fids = {n: r["fid"] for n, r in rows.items()}
    pair = [v.name for v in studies_lib.SPREAD_PAIR]
    if all(n in rows for n in pair):
        result["spread"] = {"variants": pair, "fid": [fids[n] for n in pair],
                            "abs_diff": abs(fids[pair[0]] - fids[pair[1]])}
    claims = studies_lib.judge_studies(
        args.studies, fids, {n: r["gmacs_per_forward"] for n, r in rows.items()},
        noise_metrics["fid"], args.rel_tol)
    for study in args.studies:
        names = [v.name for v in studies_lib.study_variants(study, args.size == "smoke")]
        result["studies"][study] = {"variants": [n for n in names if n in rows],
                                    "claims": claims[study]}
    result["verdicts"] = {claim: c["verdict"] for s in claims.values() for claim, c in s.items()}
    result["wall_s"] = time.perf_counter() - started
    return strict_json(result)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, data_overrides = parse_args(argv)
    import jax

    from pdm_jax import io as io_lib

    if not jax.config.jax_compilation_cache_dir:  # as pdm_jax.main: variants share programs
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "pdm_jax", "xla"))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        result = run_studies(args, data_overrides, args.out)
        plot(result, os.path.join(args.out, "paper_claims.png"))
        io_lib.write_atomic(os.path.join(args.out, "paper_claims.json"),
                            json.dumps(result, indent=1, allow_nan=False))
    else:
        with tempfile.TemporaryDirectory(prefix="paper_claims_") as tmp:
            result = run_studies(args, data_overrides, tmp)
    print(json.dumps(result, indent=1, allow_nan=False))
    return result

if __name__ == "__main__":
    main()
