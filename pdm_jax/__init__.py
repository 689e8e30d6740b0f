"""pdm_jax: Patched Diffusion Models in JAX/Flax NNX.

``pdm_jax.Pipeline`` (the inference API, see inference.py) is imported on first use, so that
``import pdm_jax`` stays light.
"""

from pdm_jax import xla_options as _xla_options

__version__ = "0.1.0"

# Before JAX starts its CPU client: measured XLA:CPU options (xla_options.py says which, why,
# and how to opt out).
_xla_options.apply_cpu_options()


def __getattr__(name: str):
    if name == "Pipeline":
        from pdm_jax.inference import Pipeline
        return Pipeline
    raise AttributeError(f"module 'pdm_jax' has no attribute {name!r}")
