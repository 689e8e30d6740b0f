"""Timestep-split ensembles (SPEC section 6): experts defined by SNR intervals only.

A model is a list of experts; each owns the steps whose SNR lies in its interval (lo, hi] and
has its own U-Net (patch size may differ; P=1 is a plain U-Net), optimiser overrides and an
optional warm start from another expert's EMA weights. A config without ``experts`` is one expert
over the whole chain and goes through the same code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pdm_jax.diffusion.schedules import Schedule, expert_index_for_steps, steps_in_snr_interval
from pdm_jax.models.unet import UNetConfig

WHOLE_CHAIN = (0.0, math.inf)
ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, jax.Array | None]]


@dataclasses.dataclass(frozen=True)
class Expert:
    """One member of the ensemble.

    Attributes:
      index: position in ``config.experts`` (what ``--config.train.expert`` selects).
      snr_interval: (lo, hi]: the expert owns the steps with lo < SNR <= hi.
      model: its U-Net.
      optim: the run's optim section with this expert's overrides applied.
      warm_start_workdir: the workdir whose expert ``warm_start_expert`` EMA weights initialise
        this expert when it has no checkpoint yet ('' = this run's own workdir).
      warm_start_expert: index of the source expert in that workdir's config (-1: no warm start).
    """

    index: int
    snr_interval: tuple[float, float]
    model: UNetConfig
    optim: ml_collections.ConfigDict
    warm_start_workdir: str = ""
    warm_start_expert: int = -1

    @property
    def name(self) -> str:
        """Checkpoint sub-directory, named by the SNR interval (robust to reordering)."""
        lo, hi = self.snr_interval
        return f"snr_{lo:g}_{hi:g}"

    def describe(self) -> str:
        lo, hi = self.snr_interval
        return f"expert {self.index} (SNR in ({lo:g}, {hi:g}], patch {self.model.patch_size})"


def _merged(base: ml_collections.ConfigDict, overrides: Any) -> dict:
    merged = base.to_dict()
    for key, value in dict(overrides or {}).items():
        if key not in merged:
            raise ValueError(f"Unknown expert override key {key!r}; known: {sorted(merged)}.")
        merged[key] = value
    return merged


def experts_from_config(config: ml_collections.ConfigDict) -> list[Expert]:
    """The validated expert list of a run config.

    Raises:
      ValueError: bad override keys, or intervals that leave a gap or overlap on the chain.
    """
    specs = list(config.get("experts", None) or [])
    if not specs:
        return [Expert(0, WHOLE_CHAIN, UNetConfig.from_dict(config.model.to_dict()),
                       config.optim)]
    experts = []
    for index, spec in enumerate(specs):
        spec = dict(spec)
        unknown = sorted(set(spec) - {"snr_interval", "model", "optim", "warm_start"})
        if unknown:
            raise ValueError(f"experts[{index}] has unknown keys {unknown}; expected "
                             f"snr_interval, model, optim, warm_start.")
        if "snr_interval" not in spec:
            raise ValueError(f"experts[{index}] needs an snr_interval (lo, hi].")
        lo, hi = (float(v) for v in spec["snr_interval"])
        warm = dict(spec.get("warm_start") or {})
        experts.append(Expert(
            index=index, snr_interval=(lo, hi),
            model=UNetConfig.from_dict(_merged(config.model, spec.get("model"))),
            optim=ml_collections.ConfigDict(_merged(config.optim, spec.get("optim"))),
            warm_start_workdir=str(warm.get("workdir", "")),
            warm_start_expert=int(warm.get("expert", -1))))
    for e in experts[1:]:
        for field in ("image_size", "in_channels", "learn_sigma", "num_classes"):
            if getattr(e.model, field) != getattr(experts[0].model, field):
                raise ValueError(
                    f"{e.describe()} has model.{field}={getattr(e.model, field)} but "
                    f"{experts[0].describe()} has {getattr(experts[0].model, field)}: experts "
                    f"of one ensemble must agree on it.")
    check_partition(experts, Schedule.from_name(config.diffusion.schedule,
                                                config.diffusion.num_timesteps))
    return experts


def check_partition(experts: Sequence[Expert], schedule: Schedule) -> np.ndarray:
    """Checks that the experts' intervals cover every step exactly once.

    Returns:
      int32 (T,): the owning expert of each original step t.

    Raises:
      ValueError: naming the first step owned by no expert or by several.
    """
    for e in experts:
        lo, hi = e.snr_interval
        if not 0.0 <= lo < hi:
            raise ValueError(f"{e.describe()}: SNR interval ({lo:g}, {hi:g}] must satisfy "
                             f"0 <= lo < hi.")
    return expert_index_for_steps(schedule, [e.snr_interval for e in experts])


def sampling_steps_per_expert(experts: Sequence[Expert], respaced: Schedule) -> list[int]:
    """How many steps of a respaced chain each expert runs."""
    owners = expert_index_for_steps(respaced, [e.snr_interval for e in experts])
    return [int(np.sum(owners == e.index)) for e in experts]


def training_timestep_range(expert: Expert, schedule: Schedule) -> tuple[int, int]:
    """Inclusive original-t range an expert trains on (uniform inside its interval, SPEC 4.5)."""
    steps = steps_in_snr_interval(schedule, *expert.snr_interval)
    return int(schedule.timesteps[steps[0]]), int(schedule.timesteps[steps[-1]])


def dispatching_model_fn(experts: Sequence[Expert], model_fns: Sequence[ModelFn],
                         schedule: Schedule) -> ModelFn:
    """A model_fn ``(x, t, y) -> (mean, v)`` that runs the expert owning step t.

    Inside the jitted sampling scan every sample of the batch is at the same t, so one
    ``lax.switch`` on the owner of ``t[0]`` runs exactly one expert per step.

    Args:
      experts: the ensemble, in config order.
      model_fns: each expert's network ``(x, t, y) -> (mean, v)``, in the same order.
      schedule: the FULL chain (owners are looked up by original t).

    Returns:
      The dispatching model function.
    """
    if len(model_fns) != len(experts):
        raise ValueError(f"Got {len(model_fns)} model functions for {len(experts)} experts.")
    if len(experts) == 1:
        return model_fns[0]
    owner_of_t = jnp.asarray(check_partition(experts, schedule), jnp.int32)

    def model_fn(x, t, y):
        return jax.lax.switch(owner_of_t[t[0]], list(model_fns), x, t, y)

    return model_fn
