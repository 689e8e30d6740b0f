"""XLA:CPU options pdm_jax sets for itself, each measured (benchmarks/RESULTS.md, "CPU speed").

They go into the XLA_FLAGS environment variable when pdm_jax is imported, which is before JAX
creates its CPU client in every pdm_jax entry point (a process that has already run a JAX
computation keeps the options it started with). They change only the CPU backend.

  * ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``: convolutions go to
    XLA's own convolution kernels instead of YNNPACK's. On the 2-core development CPU (AMD
    EPYC, AVX-512, jax 0.10.2, float32) this made the demo U-Net's forward 0.67x and its
    forward + backward 0.83x the time, and the LSUN P=4 U-Net's forward 0.75x and forward +
    backward 0.95x (processes alternated, idle machine). On jax 0.11.2 and 0.12.0.1 (Python
    3.12) YNNPACK's backward convolutions are the slow part: the flag makes the LSUN P=4
    U-Net's forward + backward at batch 4 about 0.75x the time and the demo's 0.8-0.95x,
    while the LSUN forward is about 5% slower with it (PyTorch timed alongside as the
    yardstick, two rounds); training is what the CPU is used for, so it stays on.

Set PDM_JAX_XLA_CPU_OPTIONS=0 to leave XLA_FLAGS alone. The flag names are experimental, and
XLA aborts on a flag it does not know, so they are added only for the jaxlib versions they were
measured on (JAXLIB_SERIES); anything already present in XLA_FLAGS wins.
"""

from __future__ import annotations

import importlib.metadata
import os

JAXLIB_SERIES = ("0.10.", "0.11.", "0.12.")
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def apply_cpu_options(environ: dict | None = None, jaxlib_version: str | None = None) -> list[str]:
    """Adds CPU_OPTIONS to XLA_FLAGS (see the module docstring for when).

    Args:
      environ: the environment to change (default os.environ).
      jaxlib_version: the installed jaxlib's version (default: looked up).

    Returns:
      The flags added (none if disabled, already set, or on another jaxlib series).
    """
    environ = os.environ if environ is None else environ
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if environ.get("PDM_JAX_XLA_CPU_OPTIONS") == "0" or not version.startswith(JAXLIB_SERIES):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in CPU_OPTIONS.items()
             if f"--{name}=" not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
