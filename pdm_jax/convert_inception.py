"""Deprecated alias of ``python -m pdm_jax.cli.convert_inception`` (removed in the next release)."""
import runpy, warnings  # noqa: E401
warnings.warn("pdm_jax.convert_inception moved: use pdm_jax.cli.convert_inception", FutureWarning)
if __name__ == "__main__":
    runpy.run_module("pdm_jax.cli.convert_inception", run_name="__main__", alter_sys=True)
