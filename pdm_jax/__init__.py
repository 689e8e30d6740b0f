"""pdm_jax: Patched Diffusion Models in JAX/Flax NNX.

``pdm_jax.Pipeline`` (the inference API, see inference.py) is imported on first use, so that
``import pdm_jax`` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Pipeline":
        from pdm_jax.inference import Pipeline
        return Pipeline
    raise AttributeError(f"module 'pdm_jax' has no attribute {name!r}")
