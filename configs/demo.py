r"""Demo: a class-conditional two-expert PDM ensemble on the OpenMoji demo dataset at 64x64.

The ImageNet-256 machinery at toy size: one U-Net with patch 8 owns the high-noise steps
(SNR <= 0.25), one with patch 4 the low-noise steps (SNR > 0.25); both train in one run (losses
summed) and sampling switches expert per step. The default 300 steps take about 15 minutes on a
2-core CPU (0.43 steps/s measured), then a grid is sampled.

Launch (from the repository root):
  python -m pdm_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m pdm_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=sample
  python -m pdm_jax.main --config=configs/demo.py --mode=summary --workdir=workdirs/demo
Tiny CPU variant used by the tests (16x16, seconds per step):
  python -m pdm_jax.main --config=configs/demo.py:smoke --workdir=/tmp/demo_smoke

Arguments (``configs/demo.py:key=value,...``): patch (the low-noise expert's, 4), experts (2, or
1 for a single model over the whole chain), steps (training steps), smoke.
"""

import math

from pdm_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, patch=4, experts=2, steps=300, smoke=False)
    c = config_lib.base_config()

    c.data.name = "pdm_emoji_demo"
    c.data.image_size = 64
    c.data.class_conditional = True
    c.data.shuffle_buffer = 2_000
    c.data.cache = True  # 1,859 images of 64x64: decode once, keep in memory

    c.model.image_size = 64
    c.model.patch_size = args.patch
    c.model.model_channels = 64
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (8, 4)
    c.model.num_head_channels = 64
    c.model.num_classes = 8

    c.optim.lr = 3e-4
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 1.0
    c.train.num_steps = args.steps
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.sample_every = 150
    c.train.ema_decay = 0.99
    c.train.grid_size = 16
    c.train.grid_steps = "50"
    c.ckpt.every = 150
    c.ckpt.keep = 2
    c.sample.num_samples = 64
    c.sample.batch_size = 64
    c.sample.steps = "100"
    c.sample.guidance_scale = 1.5

    # The split of the ImageNet-256 recipe (SPEC 6): SNR 0.25, t = 396 on the linear schedule.
    high_noise_patch = 2 * args.patch
    if args.experts == 2:
        c.experts = [dict(snr_interval=(0.25, math.inf)),
                     dict(snr_interval=(0.0, 0.25), model=dict(patch_size=high_noise_patch))]
    elif args.experts != 1:
        raise ValueError(f"experts={args.experts}: the demo has 1 or 2 experts.")

    if args.smoke:
        c.data.image_size = c.model.image_size = 16
        c.data.shuffle_buffer = 256
        c.model.patch_size = 2
        if args.experts == 2:
            c.experts[1]["model"]["patch_size"] = 4
        c.model.model_channels = 32
        c.model.channel_mult = (1, 2)
        c.model.attention_resolutions = (4,)
        c.model.num_head_channels = 32
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 2
        c.train.num_steps = 6 if args.steps == 300 else args.steps
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
