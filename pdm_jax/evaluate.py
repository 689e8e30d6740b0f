"""Deprecated alias of ``python -m pdm_jax.cli.evaluate`` (removed in the next release)."""
import runpy, warnings  # noqa: E401
warnings.warn("pdm_jax.evaluate moved: use pdm_jax.cli.evaluate", FutureWarning)
if __name__ == "__main__":
    runpy.run_module("pdm_jax.cli.evaluate", run_name="__main__", alter_sys=True)
