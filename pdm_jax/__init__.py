"""pdm_jax: Patched Diffusion Models in JAX/Flax NNX."""

__version__ = "0.1.0"
