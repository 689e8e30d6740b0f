"""FID of a trained run next to its data's own floor, at the same sample count.

FID is biased upwards at small sample counts, so a model's FID means little alone. This script
scores a run's EMA samples against N images of its training data and, with the same code, N
other images of the data against those N (the floor: what a perfect model would score at N).
Both go through the project's evaluator (Inception features on the mesh, ADM's metrics).

  python benchmarks/demo_fid.py --workdir=workdirs/demo --inception_path=$HOME/inception.st \
      [--num=900] [--steps=100] [--guidance_scale=3] [--sampler=ddpm]

Data: the run's data section, read once without flips in the pipeline's shuffled order; the
first N distinct images are the reference, the next N the floor's other half (N <= half the
data). A class-conditional model is sampled with the reference images' own labels, so its
samples follow the data's class frequencies as the floor's half does. Prints JSON: num, the
sampler settings, floor and model metrics, and model FID / floor.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run: its config.json and latest EMA checkpoints")
    source.add_argument("--export_dir", help="an export (--mode=export), e.g. pretrained/...")
    parser.add_argument("--inception_path", required=True)
    parser.add_argument("--num", type=int, default=0, help="samples (default: half the data)")
    parser.add_argument("--steps", default="", help="respacing (default: the run's sample.steps)")
    parser.add_argument("--sampler", default="")
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from pdm_jax import config_validation, export_format, run_loading, sharding
    from pdm_jax.diffusion.experts import experts_from_config
    from pdm_jax.evaluation import floor as floor_lib

    if args.export_dir:
        _, config, export_params = export_format.read_export(args.export_dir)
    else:
        config = run_loading.read_run_config(args.workdir)
    config.sample.update(seed=args.seed, **{k: v for k, v in (
        ("steps", args.steps), ("sampler", args.sampler),
        ("guidance_scale", args.guidance_scale)) if v not in ("", None)})
    images, labels = floor_lib.distinct_images(config.data, config.seed, 10**9)
    num = args.num or len(images) // 2
    if 2 * num > len(images):
        raise ValueError(f"--num={num}: the data holds {len(images)} distinct images, fewer "
                         f"than the 2 x {num} the floor needs.")
    mesh = sharding.make_mesh((-1, 1))
    with tempfile.TemporaryDirectory() as tmp:
        ref = floor_lib.data_floor(images, num, args.inception_path, mesh, args.batch_size,
                                   ref_path=os.path.join(tmp, "reference.npz"), labels=labels)
        config.eval.update(inception_path=args.inception_path, ref_path=ref.path,
                           num_samples=num, batch_size=args.batch_size)
        # An export has no workdir (None): its config is checked, with no checkpoints to look for.
        config_validation.validate(config, "eval", args.workdir)
        if args.export_dir:  # placed as inference.Pipeline places them
            emas = [jax.device_put(p, sharding.param_shardings(p, mesh)) for p in export_params]
        else:
            emas = [run_loading.load_expert_ema(args.workdir, e.index, mesh, config)
                    for e in experts_from_config(config)]
        model = floor_lib.reference_scorer(config, mesh, ref, steps=config.sample.steps,
                                           batch_size=args.batch_size)(emas)
    keys = floor_lib.METRIC_KEYS
    result = {"workdir": args.workdir, "export_dir": args.export_dir, "num": num,
              "data_images": len(images),
              "sampler": config.sample.sampler, "steps": config.sample.steps,
              "guidance_scale": config.sample.guidance_scale,
              "floor": ref.floor, "model": {k: model[k] for k in keys},
              "fid_over_floor": model["fid"] / ref.floor["fid"],
              "device": jax.devices()[0].device_kind}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
