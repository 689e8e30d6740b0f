r"""LSUN Church 256x256, unconditional PDM with patch size 2, 4 or 8 (SPEC sections 3 and 7).

Released recipe: Adam lr 1e-4, warmup 5k, betas (0.9, 0.99), EMA 0.9999, no dropout, batch
128 / 256 / 512 for P = 2 / 4 / 8, linear schedule, x0 output with sqrt-SNR weighting + VLB.

Launch (any host count; see launch/README.md):
  python -m pdm_jax.main --config=configs/lsun_church256.py:patch=4 \
      --workdir=gs://BUCKET/runs/lsun_church_p4
  python -m pdm_jax.main --config=configs/lsun_church256.py:patch=4 \
      --workdir=gs://BUCKET/runs/lsun_church_p4 --mode=sample --config.sample.num_samples=50000
  python -m pdm_jax.main --config=configs/lsun_church256.py:patch=8 --workdir=/tmp/x --mode=summary
The tfds dataset 'lsun/church_outdoor' must be prepared in --config.data.data_dir.
CPU-sized variant: configs/lsun_church256.py:patch=4,smoke
"""

from pdm_jax import config_lib

# patch -> (model_channels, channel_mult, num_res_blocks, batch size); SPEC section 3 table.
ARCHITECTURES = {
    2: (128, (1, 2, 2, 4, 4), 2, 128),
    4: (256, (1, 1, 2, 2), 2, 256),
    8: (256, (1, 1.5, 2), 3, 512),
}
# Training lengths of the released TF configs (SPEC 7).
TRAIN_STEPS = {2: 335_000, 4: 275_000, 8: 215_000}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, patch=4, smoke=False)
    if args.patch not in ARCHITECTURES:
        raise ValueError(f"patch={args.patch} has no released LSUN architecture; choose one of "
                         f"{sorted(ARCHITECTURES)}.")
    channels, mult, res_blocks, batch = ARCHITECTURES[args.patch]
    c = config_lib.base_config()
    c.data.name = "lsun/church_outdoor"
    c.data.image_size = 256
    c.model.image_size = 256
    c.model.patch_size = args.patch
    c.model.model_channels = channels
    c.model.channel_mult = mult
    c.model.num_res_blocks = res_blocks
    c.model.attention_resolutions = (16, 8)
    c.model.dtype = "bfloat16"
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 5_000
    c.optim.b1, c.optim.b2 = 0.9, 0.99
    c.train.batch_size = batch
    c.train.num_steps = TRAIN_STEPS[args.patch]
    c.train.ema_decay = 0.9999
    c.sample.guidance_scale = 1.0
    if args.smoke:
        config_lib.shrink_for_cpu(c)
    return c
