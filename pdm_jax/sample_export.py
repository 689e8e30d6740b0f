"""Deprecated alias of ``python -m pdm_jax.cli.sample_export`` (removed in the next release)."""
import runpy, warnings  # noqa: E401
warnings.warn("pdm_jax.sample_export moved: use pdm_jax.cli.sample_export", FutureWarning)
if __name__ == "__main__":
    runpy.run_module("pdm_jax.cli.sample_export", run_name="__main__", alter_sys=True)
