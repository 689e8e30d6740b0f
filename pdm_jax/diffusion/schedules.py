"""Noise schedules, respacing and SNR intervals (SPEC sections 4.1, 4.5, 5 and 6).

Tables are numpy float64, as in guided-diffusion: they are built once on the host and cast to
float32 only when gathered for a batch (losses.py, samplers.py), which keeps the respaced betas
1 - abar_t / abar_s accurate where abar is tiny.

Conventions used across pdm_jax:
- t is an index into a Schedule's tables. For the full chain it is the original step t; for a
  respaced chain it is the respaced index i, and `Schedule.timesteps[i]` is the original t that
  the network sees (SPEC 5: "the network always sees the original t").
- SNR(t) = abar_t / (1 - abar_t) decreases strictly with t. An SNR interval (snr_lo, snr_hi] owns
  the steps with snr_lo < SNR(t) <= snr_hi: lower end open, upper end closed, the rule of the
  reference's `get_current_model` (splits[j] >= snr > splits[j+1]). SNR is always > 0, so an
  interval with snr_lo = 0 reaches the end of the chain, and the two intervals (0, 0.25] and
  (0.25, inf] partition it: t in [396, 999] and [0, 395] for 'linear' (SPEC 6).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_NAMES = ("linear", "linearX (e.g. linear0.025)", "cosine")


def make_betas(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """Betas of a named schedule (SPEC 4.1).

    Args:
      name: 'linear' (1e-4 -> 0.02), 'linearX' such as 'linear0.025' (1e-4 -> X), or 'cosine'
        (improved DDPM, betas clipped at 0.999). Linear schedules are scaled by 1000/T as in
        guided-diffusion, so T=1000 gives exactly 1e-4 .. beta_max.
      num_timesteps: T, the number of diffusion steps.

    Returns:
      float64 array (T,).

    Raises:
      ValueError: unknown name or T < 1.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "cosine":
        return _betas_for_alpha_bar(
            num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    if name.startswith("linear"):
        suffix = name[len("linear"):]
        try:
            beta_max = float(suffix) if suffix else 0.02
        except ValueError:
            beta_max = -1.0
        if not 1e-4 < beta_max < 1.0:
            raise ValueError(f"unknown beta schedule {name!r}; accepted: {SCHEDULE_NAMES}")
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * beta_max, num_timesteps, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; accepted: {SCHEDULE_NAMES}")


def _betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    # A scalar Python loop with math.cos on purpose: it reproduces the reference table bit for bit.
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A (possibly respaced) discrete diffusion chain, all tables float64 of shape (N,).

    eq=False keeps identity hashing, so a Schedule can be closed over or passed as a static
    argument of jax.jit without hashing its arrays.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    timesteps: np.ndarray  # original-chain t of each index (arange for the full chain)
    posterior_variance: np.ndarray  # beta_tilde
    posterior_log_variance_clipped: np.ndarray  # log beta_tilde with [0] := [1] (beta_tilde_0 = 0)
    posterior_mean_coef1: np.ndarray  # multiplies x0 in the posterior mean
    posterior_mean_coef2: np.ndarray  # multiplies x_t in the posterior mean

    @classmethod
    def from_betas(cls, betas: np.ndarray, timesteps: np.ndarray | None = None) -> Schedule:
        """Builds every table from betas, with the formulas of guided-diffusion.

        Args:
          betas: (N,) values in (0, 1].
          timesteps: (N,) original-chain t of each step; defaults to arange(N).

        Returns:
          The Schedule.
        """
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must be a non-empty 1-D array in (0, 1], got {betas!r}")
        n = betas.shape[0]
        timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
        if timesteps.shape != (n,):
            raise ValueError(f"timesteps shape {timesteps.shape} does not match betas ({n},)")
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta_tilde_0 = 0, so its log is clipped to the next value (guided-diffusion convention).
        post_log_var = np.log(np.append(post_var[1], post_var[1:]) if n > 1 else betas)
        return cls(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            timesteps=timesteps,
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        )

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000) -> Schedule:
        """Full chain of a named schedule (see make_betas)."""
        return cls.from_betas(make_betas(name, num_timesteps))

    @property
    def num_steps(self) -> int:
        """Number of steps N of this chain."""
        return int(self.betas.shape[0])

    @property
    def snr(self) -> np.ndarray:
        """SNR = abar / (1 - abar), float64 (N,), strictly decreasing."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod)

    @property
    def sqrt_recip_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod)

    @property
    def sqrt_recipm1_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod - 1.0)

    def respace(self, spec: str) -> Schedule:
        """Keeps a subset of steps (SPEC 5) and recomputes the betas between kept steps.

        Args:
          spec: a respacing string, see `respace_timesteps`.

        Returns:
          A Schedule with beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}} (abar_{t_{-1}} = 1), so its
          abar' equals this chain's abar at the kept steps, and timesteps = the kept original t.
        """
        kept = respace_timesteps(spec, self.num_steps)
        abar = self.alphas_cumprod[kept]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return Schedule.from_betas(betas, timesteps=self.timesteps[kept])


def _parse_int(text: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"malformed respacing {spec!r}; accepted: 'N', comma sections 'N1,N2,...' or 'ddimN' "
            "with positive integers"
        )
    return value


def respace_timesteps(spec: str, num_timesteps: int) -> np.ndarray:
    """Original-chain steps kept by a respacing (guided-diffusion `space_timesteps`).

    Args:
      spec: "N" (N steps evenly strided with a fractional stride, rounded: 250 of 1000 ->
        0, 4, 8, ..., 995, 999); "N1,N2,..." (the chain cut into equal sections, section k
        strided to N_k steps); "ddimN" (the smallest integer stride s with exactly N steps in
        range(0, T, s), the DDIM paper's striding).
      num_timesteps: T of the chain being respaced.

    Returns:
      Sorted int64 array of kept steps.

    Raises:
      ValueError: malformed spec, a section asking for more steps than it holds, or a ddim count
        no integer stride gives.
    """
    spec = str(spec).strip()
    if spec.startswith("ddim"):
        count = _parse_int(spec[len("ddim"):], spec)
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == count:
                return np.arange(0, num_timesteps, stride, dtype=np.int64)
        raise ValueError(
            f"respacing {spec!r}: no integer stride gives exactly {count} of {num_timesteps} steps"
        )
    counts = [_parse_int(part.strip(), spec) for part in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if count > size:
            raise ValueError(
                f"respacing {spec!r}: section {k} holds {size} steps, cannot take {count}"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Python's round (half to even) on the running float index, exactly as the reference.
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return np.array(sorted(set(steps)), dtype=np.int64)


def timestep_range_for_snr_interval(
    schedule: Schedule, snr_lo: float, snr_hi: float
) -> tuple[int, int]:
    """Inclusive original-t range of the steps whose SNR lies in (snr_lo, snr_hi].

    Lower end open, upper end closed (module docstring); snr_hi may be math.inf. Because SNR
    decreases with t, a high-SNR interval owns low t.

    Args:
      schedule: the chain (full or respaced).
      snr_lo: lower SNR bound, excluded (>= 0).
      snr_hi: upper SNR bound, included (> snr_lo).

    Returns:
      (t_first, t_last), original-chain steps, both included.

    Raises:
      ValueError: bad bounds or no step of the chain in the interval.
    """
    idx = steps_in_snr_interval(schedule, snr_lo, snr_hi)
    return int(schedule.timesteps[idx[0]]), int(schedule.timesteps[idx[-1]])


def steps_in_snr_interval(schedule: Schedule, snr_lo: float, snr_hi: float) -> np.ndarray:
    """Indices into `schedule` of the steps with snr_lo < SNR <= snr_hi (sorted, non-empty)."""
    if not (0.0 <= snr_lo < snr_hi):
        raise ValueError(f"SNR interval ({snr_lo}, {snr_hi}] must satisfy 0 <= lo < hi")
    snr = schedule.snr
    idx = np.nonzero((snr > snr_lo) & (snr <= snr_hi))[0]
    if idx.size == 0:
        raise ValueError(
            f"SNR interval ({snr_lo}, {snr_hi}] holds no step; the chain spans SNR "
            f"[{snr.min():.4g}, {snr.max():.4g}]"
        )
    return idx


def expert_index_for_steps(
    schedule: Schedule, intervals: Sequence[tuple[float, float]]
) -> np.ndarray:
    """Which SNR interval owns each step of `schedule` (SPEC 6).

    Args:
      schedule: the chain (full or respaced).
      intervals: one (snr_lo, snr_hi] per expert, in the experts' order.

    Returns:
      int32 array (N,): the interval index of each step.

    Raises:
      ValueError: a step owned by no interval or by several.
    """
    snr = schedule.snr
    owners = np.stack([(snr > lo) & (snr <= hi) for lo, hi in intervals])
    count = owners.sum(axis=0)
    if (count != 1).any():
        bad = int(np.nonzero(count != 1)[0][0])
        raise ValueError(
            f"SNR intervals {list(intervals)} must partition the chain; step t="
            f"{int(schedule.timesteps[bad])} (SNR {snr[bad]:.4g}) is owned {int(count[bad])} times"
        )
    return np.argmax(owners, axis=0).astype(np.int32)


def sample_timesteps(
    rng: jax.Array, batch_size: int, t_min: int = 0, t_max: int = 999
) -> jnp.ndarray:
    """Training timesteps, uniform over {t_min, ..., t_max}, both ends included (SPEC 4.5).

    t_max is inclusive on purpose: the TF reference never trained t = T-1 (SPEC 8). Pass the
    output of `timestep_range_for_snr_interval` to train one expert on its interval.

    Args:
      rng: PRNG key.
      batch_size: B.
      t_min: first step (default 0).
      t_max: last step, included (default 999 = T-1 for T = 1000).

    Returns:
      int32 array (B,).
    """
    if isinstance(t_min, int) and isinstance(t_max, int) and not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    return jax.random.randint(rng, (batch_size,), t_min, t_max + 1, dtype=jnp.int32)
