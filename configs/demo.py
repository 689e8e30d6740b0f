r"""Demo: a class-conditional patched diffusion model (patch 4) on curated OpenMoji emoji at 32x32.

The quick start. One U-Net with patch size 4 (an 8x8 token grid) predicts x0 over the whole
chain, trained on `pdm_emoji_demo/curated`: 227 emoji in six look-alike groups (faces, hearts,
shapes, clocks, moons, fruit), the class label picking the group. The recipe was chosen by
benchmarks/demo_recipe_sweep.py (benchmarks/RESULTS.md) for a grid a stranger recognises after
about 10 minutes of a 2-core CPU: x0 output without a learned variance, batch 16, lr 2e-3, samples
without guidance (it greys the white background). The full
set of 1,859 unrelated pictograms (`data.name=pdm_emoji_demo`, 8 classes) draws only coloured
blobs at that budget. `experts=2` gives the ImageNet-256 machinery at toy size instead: a patch-8
U-Net for the high-noise steps (SNR <= 0.25) and the patch-4 one for the rest, trained together.
`long` trains a wider network (model_channels 96 instead of 64, 10.8 M parameters) for 24,000
steps with a slower EMA: the recipe whose FID comes within 1.5x of the data's own floor (1.48x
on average over sampler seeds, README "Measured"; the width-64 network stopped at 1.59x).

Launch (from the repository root):
  python -m pdm_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m pdm_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=sample
  python -m pdm_jax.main --config=configs/demo.py --mode=summary --workdir=workdirs/demo
  python -m pdm_jax.main --config=configs/demo.py:long --workdir=workdirs/demo_long
Tiny CPU variant used by the tests (16x16, two experts with learned variances, seconds a step):
  python -m pdm_jax.main --config=configs/demo.py:smoke --workdir=/tmp/demo_smoke

Arguments (``configs/demo.py:key=value,...``): patch (the low-noise expert's, 4), experts (1 for
the demo, 2 for its smoke variant; 1 or 2), steps (training steps), long, smoke.
"""

import math

from pdm_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, patch=4, experts=0, steps=0, long=False, smoke=False)
    # 0: the variant's own default (the smoke variant exercises the two-expert path).
    num_experts = args.experts or (2 if args.smoke else 1)
    c = config_lib.base_config()

    c.data.name = "pdm_emoji_demo/curated"
    c.data.image_size = 32
    c.data.class_conditional = True
    c.data.shuffle_buffer = 256
    c.data.cache = True  # 227 images: decode once, keep in memory

    c.model.image_size = 32
    c.model.patch_size = args.patch
    # The long recipe's width: at 64 its FID stayed at 1.59x the data's floor from 12,000 to
    # 24,000 steps (capacity, not steps, was short); 96 reached 1.48x (mean of three sampler
    # seeds, README "Measured").
    c.model.model_channels = 96 if args.long else 64
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    tokens = c.model.image_size // args.patch  # attention at the two coarser levels
    c.model.attention_resolutions = (tokens // 2, tokens // 4)
    c.model.num_head_channels = 64
    c.model.num_classes = 6
    # The sweep's finding: a learned variance (hybrid loss) gains nothing visible this early.
    c.model.learn_sigma = False

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 1.0
    c.train.num_steps = args.steps or (24_000 if args.long else 4_000)
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.sample_every = 500 if not args.long else 2_000
    c.train.ema_decay = 0.999 if args.long else 0.99
    c.train.grid_size = 36  # six per class, a column each
    c.train.grid_steps = "100"
    c.ckpt.every = 500 if not args.long else 2_000
    c.ckpt.keep = 2
    c.sample.num_samples = 64
    c.sample.batch_size = 64
    # The long recipe's FID keeps falling with sampler steps (at width 64, DDPM 100 / 250 /
    # 1000: 96.4 / 91.8 / 86.7 at 113 samples, README "Measured"); the training grids stay at
    # grid_steps.
    c.sample.steps = "1000" if args.long else "100"
    # No guidance (w = 1): guided sampling thresholds x0 dynamically (SPEC 5, as released), and
    # a guided white background overshoots 1, so the rescale greys the whole image (background
    # ~225 of 255 at w = 1.5 to 3 in a 2,000-step run, 250 at w = 1; benchmarks/RESULTS.md).
    c.sample.guidance_scale = 1.0

    # The split of the ImageNet-256 recipe (SPEC 6): SNR 0.25, t = 396 on the linear schedule.
    high_noise_patch = 2 * args.patch
    if num_experts == 2:
        c.experts = [dict(snr_interval=(0.25, math.inf)),
                     dict(snr_interval=(0.0, 0.25), model=dict(patch_size=high_noise_patch))]
    elif num_experts != 1:
        raise ValueError(f"experts={args.experts}: the demo has 1 or 2 experts.")

    if args.smoke:
        c.data.image_size = c.model.image_size = 16
        c.data.shuffle_buffer = 256
        c.model.patch_size = 2
        if num_experts == 2:
            c.experts[1]["model"]["patch_size"] = 4
        # The tests cover the learned-variance (hybrid loss) path; their samples use w = 1.5.
        c.model.learn_sigma = True
        c.sample.guidance_scale = 1.5
        c.model.model_channels = 32
        c.model.channel_mult = (1, 2)
        # Attention in the middle block only: level attention doubles the compile time of the
        # tests' train steps and samplers (tests/test_unet*.py cover it at every resolution).
        c.model.attention_resolutions = ()
        c.model.num_head_channels = 32
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 2
        c.train.num_steps = args.steps or 6
        c.train.batch_size = 16
        c.train.log_every = 2
        c.train.sample_every = 0
        c.train.grid_size = 8
        c.train.grid_steps = "5"
        c.ckpt.every = 3
        c.sample.num_samples = 16
        c.sample.batch_size = 16
        c.sample.steps = "5"
    return c
