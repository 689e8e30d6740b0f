r"""FFHQ 1024x1024, unconditional PDM with patch size 4 (SPEC sections 3 and 7).

Released recipe: c=128, mult 1,2,2,4,4,4 (patched 256 -> 8), 2 res blocks, attention at 16 and 8,
schedule linear0.025, Adam lr 1e-4, warmup 5k, betas (0.9, 0.98), EMA 0.9999, batch 32.

Launch (FFHQ as an image folder of 1024x1024 PNGs):
  python -m pdm_jax.main --config=configs/ffhq1024.py --config.data.folder=/data/ffhq1024 \
      --workdir=gs://BUCKET/runs/ffhq1024
  python -m pdm_jax.main --config=configs/ffhq1024.py --workdir=/tmp/x --mode=summary
CPU-sized variant: configs/ffhq1024.py:smoke
"""

from pdm_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False)
    c = config_lib.base_config()
    c.data.name = "folder"
    c.data.image_size = 1024
    c.model.image_size = 1024
    c.model.patch_size = 4
    c.model.model_channels = 128
    c.model.channel_mult = (1, 2, 2, 4, 4, 4)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (16, 8)
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.diffusion.schedule = "linear0.025"
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 5_000
    c.optim.b1, c.optim.b2 = 0.9, 0.98
    c.train.batch_size = 32
    c.train.num_steps = 780_000  # the released TF config (SPEC 7)
    c.train.ema_decay = 0.9999
    c.sample.guidance_scale = 1.0
    if args.smoke:
        config_lib.shrink_for_cpu(c)
    return c
