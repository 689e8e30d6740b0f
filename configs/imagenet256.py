r"""ImageNet 256x256, class-conditional timestep-split ensemble with guidance (SPEC 3, 6, 7).

Two experts split at SNR 0.25 (t = 396 on the linear schedule: [0, 395] low noise, [396, 999]
high noise; with 250 sampling steps 99 and 151 steps).

recipe=project (default): the low-noise expert (SNR > 0.25) is an UNPATCHED ADM-style U-Net
  (P=1, c=256, mult 1,1,2,2,4,4, attention at 32/16/8); the high-noise expert (SNR <= 0.25) is
  the released P=4 U-Net (c=256, mult 1,2,2,2, 3 res blocks, 202.1 M parameters).
  `swap` gives the opposite assignment (P=4 low noise, P=1 high noise).
recipe=paper: the released recipe: both experts P=4; the high-noise expert trains first (betas
  0.9/0.98); the low-noise expert is warm-started from its EMA weights with lr 5e-5, warmup 10k,
  beta2 0.999.

Launch (data: tfds imagenet2012 prepared from the manual download in --config.data.manual_dir):
  # both experts in one run (losses summed):
  python -m pdm_jax.main --config=configs/imagenet256.py --workdir=gs://BUCKET/runs/in256 \
      --config.data.manual_dir=gs://BUCKET/imagenet/manual
  # or one expert at a time (paper recipe: high-noise expert 1 first, then expert 0):
  python -m pdm_jax.main --config=configs/imagenet256.py:recipe=paper \
      --workdir=gs://BUCKET/runs/in256_paper --config.train.expert=1
  python -m pdm_jax.main --config=configs/imagenet256.py:recipe=paper \
      --workdir=gs://BUCKET/runs/in256_paper --config.train.expert=0
  # 50k samples for FID, 250 DDPM steps, guidance 1.5:
  python -m pdm_jax.main --config=configs/imagenet256.py --workdir=gs://BUCKET/runs/in256 \
      --mode=sample --config.sample.num_samples=50000 --config.sample.batch_size=500
  python -m pdm_jax.main --config=configs/imagenet256.py --workdir=/tmp/in256 --mode=summary
CPU-sized variant (same structure, 16x16): configs/imagenet256.py:smoke (add recipe=paper).
"""

import math

from pdm_jax import config_lib

RELEASED_P4 = dict(patch_size=4, model_channels=256, channel_mult=(1, 2, 2, 2),
                   num_res_blocks=3, attention_resolutions=(16, 8))
ADM_P1 = dict(patch_size=1, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4),
              num_res_blocks=2, attention_resolutions=(32, 16, 8))
LOW_NOISE, HIGH_NOISE = (0.25, math.inf), (0.0, 0.25)


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, recipe="project", swap=False, smoke=False)
    if args.recipe not in ("project", "paper"):
        raise ValueError(f"recipe={args.recipe!r}; expected 'project' or 'paper'.")
    c = config_lib.base_config()
    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.class_conditional = True
    c.model.image_size = 256
    c.model.num_classes = 1000
    c.model.num_head_channels = 64
    c.model.dtype = "bfloat16"
    c.model.update(RELEASED_P4)
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 5_000
    c.optim.b1, c.optim.b2 = 0.9, 0.99
    c.train.batch_size = 256
    # 500k steps per expert (SPEC 7): a joint run steps both experts at once.
    c.train.num_steps = 500_000
    c.train.ema_decay = 0.9999
    c.train.label_dropout = 0.1
    c.sample.steps = "250"
    c.sample.guidance_scale = 1.5

    high_noise_optim = dict(b2=0.98)
    if args.recipe == "paper":
        low, high = dict(RELEASED_P4), dict(RELEASED_P4)
        # Warm start from expert 1 (high noise) of this same workdir.
        low_extra = dict(optim=dict(lr=5e-5, warmup_steps=10_000, b2=0.999),
                         warm_start=dict(workdir="", expert=1))
    else:
        low, high = (dict(RELEASED_P4), dict(ADM_P1)) if args.swap else (dict(ADM_P1),
                                                                       dict(RELEASED_P4))
        low_extra = {}
    if args.smoke:
        config_lib.shrink_for_cpu(c)
        c.model.num_classes = 1000
        for arch in (low, high):
            arch.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,) if arch["patch_size"] == 4 else (8,),
                        patch_size=arch["patch_size"])
    c.experts = [dict(snr_interval=LOW_NOISE, model=low, **low_extra),
                 dict(snr_interval=HIGH_NOISE, model=high, optim=high_noise_optim)]
    return c
