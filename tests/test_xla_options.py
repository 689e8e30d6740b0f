"""pdm_jax's XLA:CPU options: when they are added, and that they reach the compiler."""

import os

import jax
import jax.numpy as jnp
import pytest

from pdm_jax import xla_options

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


@pytest.mark.parametrize("version", ["0.10.2", "0.11.2", "0.12.0.1"])
def test_added_once_after_the_users_flags(version):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_options.apply_cpu_options(env, version) == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert xla_options.apply_cpu_options(env, version) == []  # idempotent


@pytest.mark.parametrize("env,version", [
    ({"PDM_JAX_XLA_CPU_OPTIONS": "0"}, "0.10.2"),  # opted out
    ({}, "0.13.0"),  # a jaxlib the flag was not measured on: XLA aborts on unknown flags
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=reduce"}, "0.10.2"),  # user's wins
])
def test_left_alone(env, version):
    before = dict(env)
    assert xla_options.apply_cpu_options(env, version) == []
    assert env == before


@pytest.mark.skipif(not xla_options._jaxlib_version().startswith(xla_options.JAXLIB_SERIES)
                    or os.environ.get("PDM_JAX_XLA_CPU_OPTIONS") == "0",
                    reason="the options apply to the jaxlib series they were measured on, "
                           "unless opted out")
def test_this_process_compiles_convolutions_without_ynnpack():
    """Importing pdm_jax (conftest does, before JAX starts) set the flag, and XLA obeyed it."""
    assert FLAG in os.environ["XLA_FLAGS"]
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    hlo = conv.lower(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))).compile().as_text()
    assert " convolution(" in hlo and "ynn_fusion" not in hlo, hlo
