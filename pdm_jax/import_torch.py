"""Deprecated alias of ``python -m pdm_jax.cli.import_torch`` (removed in the next release)."""
import runpy, warnings  # noqa: E401
warnings.warn("pdm_jax.import_torch moved: use pdm_jax.cli.import_torch", FutureWarning)
if __name__ == "__main__":
    runpy.run_module("pdm_jax.cli.import_torch", run_name="__main__", alter_sys=True)
