"""U-Net architecture: released parameter counts, argument validation, dtype and remat paths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pdm_jax.models.unet import UNet, UNetConfig, count_params

# SPEC section 3 table: (config, params in millions).
RELEASED = {
    "lsun_church_p2": (dict(image_size=256, patch_size=2, model_channels=128,
                            channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2), 122.9),
    "lsun_church_p4": (dict(image_size=256, patch_size=4, model_channels=256,
                            channel_mult=(1, 1, 2, 2), num_res_blocks=2), 121.4),
    "lsun_church_p8": (dict(image_size=256, patch_size=8, model_channels=256,
                            channel_mult=(1, 1.5, 2), num_res_blocks=3), 121.0),
    "ffhq1024_p4": (dict(image_size=1024, patch_size=4, model_channels=128,
                         channel_mult=(1, 2, 2, 4, 4, 4), num_res_blocks=2), 162.6),
    "imagenet256_p4_expert": (dict(image_size=256, patch_size=4, model_channels=256,
                                   channel_mult=(1, 2, 2, 2), num_res_blocks=3,
                                   num_classes=1000), 202.1),
}

TINY = UNetConfig(image_size=16, patch_size=2, model_channels=32, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(4,), num_head_channels=32,
                  num_classes=5)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_parameter_counts_within_half_percent(name):
    kwargs, millions = RELEASED[name]
    params = count_params(UNetConfig(**kwargs))  # abstract evaluation: nothing is allocated
    assert abs(params / 1e6 - millions) / millions < 0.005, (name, params)


@pytest.mark.parametrize("arg, params", [("", 4_803_504), ("long=True", 10_753_392)])
def test_demo_recipes_have_the_parameter_counts_the_readme_states(arg, params):
    """The quick start's network (also the shipped width-64 export's) and the long recipe's
    wider one (configs/demo.py, README "Measured")."""
    from conftest import demo_config

    assert count_params(UNetConfig.from_dict(demo_config(arg).model.to_dict())) == params


@pytest.mark.parametrize("overrides, message", [
    (dict(patch_size=3), "patch_size=3 does not divide image_size=16"),
    (dict(model_channels=24), "not divisible by num_groups=32"),
    (dict(attention_resolutions=(5,)), r"attention_resolutions \[5\] never occur"),
    (dict(dtype="float16"), "Unknown dtype 'float16'"),
    (dict(num_res_blocks=(1, 1, 1)), "has 3 entries; channel_mult has 2 levels"),
    (dict(channel_mult=(1, 2, 2, 2, 2)), "cannot be halved 4 times"),
])
def test_bad_arguments_raise_at_construction(overrides, message):
    config = dataclasses.replace(TINY, **overrides)
    with pytest.raises(ValueError, match=message):
        UNet(config, rngs=nnx.Rngs(0))


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"Unknown U-Net config keys \['widht'\]"):
        UNetConfig.from_dict({"widht": 3})


def _random_model(config):
    """A U-Net whose every parameter (zero-inits too) is noise, so every layer shows.

    Built abstractly and filled from numpy: eager initialisation would compile one small
    program per parameter shape.
    """
    model = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
    _randomise(model)
    return model


def _randomise(model):
    # numpy, not jax.random: one eager jax.random call per shape would compile ~100 programs.
    rng = np.random.default_rng(1)
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    leaves = [jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(tree, leaves))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    return x, jnp.array([3, 999]), jnp.array([1, 5])


def _forward(config, inputs, params=None):
    model = _random_model(config)
    if params is not None:
        nnx.update(model, params)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    return nnx.state(model, nnx.Param), run(state, *inputs)


def test_output_shapes_and_variance_range(inputs):
    _, (mean, v) = _forward(TINY, inputs)
    assert mean.shape == v.shape == (2, 16, 16, 3)
    assert mean.dtype == v.dtype == jnp.float32
    assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0


def test_bf16_compute_stays_close_to_fp32_and_returns_fp32(inputs):
    params, (mean32, _) = _forward(TINY, inputs)
    _, (mean16, v16) = _forward(dataclasses.replace(TINY, dtype="bfloat16"), inputs, params)
    assert mean16.dtype == v16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(mean16 - mean32) / jnp.linalg.norm(mean32))
    assert 0 < rel < 0.05


def test_remat_changes_neither_outputs_nor_gradients(inputs):
    x, t, y = inputs
    grads = {}
    for remat in (False, True):
        model = _random_model(dataclasses.replace(TINY, remat=remat))
        graphdef, state = nnx.split(model)

        def loss(state):
            mean, v = nnx.merge(graphdef, state)(x, t, y)
            return jnp.mean(mean**2) + jnp.mean(v)

        grads[remat] = jax.jit(jax.value_and_grad(loss))(state)
    np.testing.assert_allclose(grads[True][0], grads[False][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads[True][1]), jax.tree.leaves(grads[False][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_variance_head_does_not_train_the_trunk(inputs):
    """SPEC 3.7: the variance head reads stop-gradiented features; only its own layers and
    (by default, as in the reference) the time MLP receive the VLB gradient."""
    x, t, y = inputs
    for to_time_mlp in (True, False):
        model = _random_model(dataclasses.replace(TINY, variance_grad_to_time_mlp=to_time_mlp))
        graphdef, state = nnx.split(model)
        grads = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x, t, y)[1])))(state)
        flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(grads)}
        nonzero = {k for k, g in flat.items() if float(jnp.abs(g[...]).max()) > 0}
        expected = {k for k in flat if k.startswith("var_")}
        if to_time_mlp:
            expected |= {k for k in flat if k.startswith("time_mlp")}
        assert nonzero == expected


def test_labels_required_iff_class_conditional(inputs):
    x, t, _ = inputs
    model = _random_model(TINY)
    with pytest.raises(ValueError, match="Labels must be given iff num_classes > 0"):
        model(x, t, None)
