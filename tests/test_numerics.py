"""The released numerics (SPEC 7): float32 first conv and output heads under bf16 compute, the
nearest-rank threshold quantile, ADM's uint8 truncation, and the eps-with-patches warning."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from conftest import demo_config
from pdm_jax import config_validation, io as io_lib
from pdm_jax.diffusion import samplers
from pdm_jax.models.unet import UNet, UNetConfig

TINY_BF16 = UNetConfig(image_size=16, patch_size=2, model_channels=32, channel_mult=(1, 2),
                       num_res_blocks=1, attention_resolutions=(), num_head_channels=32,
                       num_classes=0, dtype="bfloat16")


def test_bf16_model_keeps_first_conv_and_output_heads_in_float32():
    model = UNet(TINY_BF16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # The output convs are zero-initialised (their output would be exactly 0): give them weights.
    for conv in (model.out_conv, model.var_conv_2):
        conv.kernel[...] = jnp.asarray(rng.normal(0, 0.05, conv.kernel.shape), jnp.float32)
    assert {c.dtype for c in (model.input_conv, model.out_conv, model.var_conv_2)} == {
        jnp.float32}
    assert model.input_blocks[0].res.in_conv.dtype == jnp.bfloat16  # the trunk computes in bf16
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    mean, v = model(x, jnp.array([10, 900]))
    mean = np.asarray(mean)
    # A bf16 head would round x0 to 8 significant bits (up to ~0.002 here, weighted ~100x by
    # sqrt(SNR) at the lowest t); the float32 head's values are not bf16-representable.
    as_bf16 = mean.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert mean.dtype == np.float32 and np.mean(mean != as_bf16) > 0.9
    assert np.abs(mean - as_bf16).max() > 1e-4


def test_dynamic_threshold_uses_the_nearest_rank_quantile():
    # 1000 values per sample: |x| = 0.01, 0.02, ..., 10.0. Nearest rank of q=0.995 is index
    # round(0.995 * 999) = 994 -> 9.95; linear interpolation would give 9.951.
    values = np.arange(1, 1001, dtype=np.float32) / 100.0
    x0 = jnp.asarray(np.stack([values, -values[::-1]]).reshape(2, 10, 10, 10))
    out = np.asarray(samplers.dynamic_threshold(x0))
    s = np.float32(9.95)
    np.testing.assert_allclose(out[0].ravel(), np.clip(values, -s, s) / s, rtol=1e-6)
    assert np.abs(out).max() == 1.0
    inside = jnp.full((1, 4, 4, 3), 0.5)
    np.testing.assert_array_equal(samplers.dynamic_threshold(inside), inside)  # s = max(q, 1)


def test_samples_become_uint8_by_truncation_as_in_adm_and_data_round_trips_exactly():
    x = np.array([-1.5, -1.0, -0.9999, 0.0, 0.999, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(io_lib.to_uint8(x), [0, 0, 0, 127, 254, 255, 255])
    u = np.arange(256, dtype=np.float32)
    np.testing.assert_array_equal(io_lib.data_to_uint8(u / 127.5 - 1.0), np.arange(256))


def test_eps_with_a_patched_model_warns_and_x0_or_unpatched_eps_do_not(caplog):
    config = demo_config("smoke")  # patches 2 and 4
    config.diffusion.update(parameterization="eps", weighting="snr")
    config_validation.validate(config, "summary")  # not a training: no warning
    assert "fragile" not in caplog.text
    config_validation.validate(config, "train")
    assert "parameterization='eps' with patch size [2, 4]" in caplog.text
    caplog.clear()
    config.diffusion.update(parameterization="x0", weighting="sqrt_snr")
    config_validation.validate(config, "train")
    config.diffusion.update(parameterization="eps", weighting="snr")
    config.experts = []
    config.model.patch_size = 1
    config_validation.validate(config, "train")
    assert "fragile" not in caplog.text
    assert jax.device_count() == 8
