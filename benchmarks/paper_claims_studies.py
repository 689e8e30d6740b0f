"""The studies of benchmarks/paper_claims.py: which variants each trains, and its verdict rules.

A variant is one model: a patch size (or a two-expert split at SNR 0.25), an output
parameterisation, a loss weighting, a training budget (the study's images, or the FLOPs the
single P=1 model spends on them) and a seed offset. Its name follows from those fields, so a
variant two studies share (P=4, x0, sqrt_snr) is trained once and reported in both.

Verdict rules (FID, lower is better; ``fids`` maps variant names to FID at the same N):
  * Two FIDs differ only beyond the tolerance max(rel_tol x the smaller FID, seed spread), where
    the seed spread is |FID(p4_x0) - FID(p4_x0_seed1)|: the same model trained and sampled with
    another seed. A difference within the tolerance counts as "the same quality".
  * A quality comparison is conclusive only if every variant in it beats the noise baseline (N
    uniform-noise images against the reference) by more than the tolerance; otherwise the
    models did not learn enough to say anything, and the verdict is "inconclusive".
  * A claim with several parts is a conjunction: "agree" if every part agrees, "disagree" if any
    part disagrees, else "inconclusive".
  * A variant not run (``--variants``, the smoke size) or without a finite FID makes the parts
    that need it inconclusive; without the seed pair the tolerance is rel_tol alone.
The claims (the seed's numbering, issue 16):
  1 patching: GMACs per forward fall roughly as P^2 (ratio to P=1 within [P^2/2, 2 P^2]),
    P=4 keeps P=1's quality (not worse), and P=4 is the best trade-off among 2, 4, 8 (P=4 not
    worse than P=2 and P=8 worse than P=4; P=8 not worse than P=4 disagrees).
  2 coarse networks suffice at high noise (its consequence for samples; ``--mode=analyze``
    measures the blur itself): each designed split (coarse P at SNR <= 0.25) is not worse than
    its swap at equal images (same cost per step); worse disagrees.
  3 objectives: at P=1 and at P=4, with the usual weightings and with sqrt(SNR) for all, the
    better of x0 and v beats eps (eps better than both disagrees).
  4 expert split: the best designed split beats the best single model (P=1 or P=4), at equal
    images and at equal train FLOPs (worse disagrees, the same quality is inconclusive).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

SNR_SPLIT = 0.25  # the ImageNet-256 boundary (SPEC 6)
PATCH_SIZES = (1, 2, 4, 8)
# Each output's usual weighting in x0 space (diffusion/losses.py): the seed's sqrt(SNR) for x0
# (the project's default), SNR for eps (= eps-MSE), SNR + 1 for v (= v-MSE).
USUAL_WEIGHTING = {"x0": "sqrt_snr", "eps": "snr", "v": "snr+1"}
SEED_WEIGHTING = "sqrt_snr"
# (high-noise expert's P, low-noise expert's P): the designed splits, then their swaps.
DESIGNED_SPLITS = ((4, 1), (4, 2))
SPLITS = DESIGNED_SPLITS + tuple((lo, hi) for hi, lo in DESIGNED_SPLITS)
STUDIES = ("patch", "objective", "split")
VERDICTS = ("agree", "disagree", "inconclusive")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One trained model of a study.

    Attributes:
      patch: one expert's patch size, or (P for SNR <= 0.25, P for SNR > 0.25).
      parameterization: 'x0', 'eps' or 'v'.
      weighting: x0-space loss weighting (losses.WEIGHTINGS).
      budget: 'images' (the study's image count) or 'flops' (the FLOPs of the single P=1 model
        on those images).
      seed_offset: added to the run's seed (training and sampling).
    """

    patch: int | tuple[int, int]
    parameterization: str = "x0"
    weighting: str = SEED_WEIGHTING
    budget: str = "images"
    seed_offset: int = 0

    @property
    def name(self) -> str:
        if isinstance(self.patch, tuple):
            base = f"split_noisy_p{self.patch[0]}_clean_p{self.patch[1]}"
        else:
            base = f"p{self.patch}"
        if (self.parameterization, self.weighting) != ("x0", SEED_WEIGHTING):
            base += f"_{self.parameterization}_{self.weighting}"
        else:
            base += "_x0"
        return base + ("_flops" if self.budget == "flops" else "") + (
            f"_seed{self.seed_offset}" if self.seed_offset else "")

    def overrides(self) -> dict[str, Any]:
        """The config changes from the study's base (JSON-ready: the open SNR end is 'inf')."""
        out: dict[str, Any] = {"diffusion": {"parameterization": self.parameterization,
                                             "weighting": self.weighting}}
        if isinstance(self.patch, tuple):
            out["experts"] = [
                {"snr_interval": [SNR_SPLIT, "inf"], "model": {"patch_size": self.patch[1]}},
                {"snr_interval": [0.0, SNR_SPLIT], "model": {"patch_size": self.patch[0]}}]
        else:
            out["model"] = {"patch_size": self.patch}
        if self.seed_offset:
            out["seed_offset"] = self.seed_offset
        return out


# The FLOP budget of study c is this model's train FLOPs on the study's images; the seed spread
# comes from the pair below.
FLOPS_REFERENCE = Variant(1)
SPREAD_PAIR = (Variant(4), Variant(4, seed_offset=1))


def study_variants(study: str, smoke: bool = False) -> list[Variant]:
    """The variants of one study (see the module docstring).

    Args:
      study: one of STUDIES.
      smoke: the smoke size's subset (P = 1 and 4; the designed P=4/P=1 split), which runs
        every path of the runner with few programs to compile and few FIDs to compute (each
        costs seconds at 2048-d, whatever N); its verdicts lack parts.
    """
    if study == "patch":
        return [Variant(p) for p in ((1, 4) if smoke else PATCH_SIZES)]
    if study == "objective":
        if smoke:
            return [Variant(4)]
        return [Variant(p, param, w) for p in (1, 4) for param in ("x0", "eps", "v")
                for w in dict.fromkeys((USUAL_WEIGHTING[param], SEED_WEIGHTING))]
    if study == "split":
        splits = DESIGNED_SPLITS[:1] if smoke else SPLITS
        models = [Variant(1), Variant(4)] + [Variant(s) for s in splits]
        # The P=1 model spends the budget exactly: its equal-FLOPs run is its equal-images run.
        return models + [dataclasses.replace(v, budget="flops") for v in models[1:]]
    raise ValueError(f"Unknown study {study!r}; known: {STUDIES}.")


def all_variants(studies: list[str], smoke: bool = False) -> dict[str, Variant]:
    """Every variant the studies need, deduplicated by name, plus the seed-spread pair (not at
    the smoke size: its tolerance is then rel_tol alone)."""
    variants = {v.name: v for s in studies for v in study_variants(s, smoke)}
    if not smoke:
        variants.update({v.name: v for v in SPREAD_PAIR})
    return variants


#### Verdicts ####


class Judge:
    """Compares FIDs with the tolerance and the noise gate of the module docstring.

    Variants that were not run make the parts that need them inconclusive (partial runs, the
    smoke size); without the seed-spread pair the tolerance is rel_tol alone.

    Args:
      fids: FID per variant name (at the same N).
      noise_fid: the uniform-noise baseline's FID.
      rel_tol: relative tolerance.
    """

    def __init__(self, fids: dict[str, float], noise_fid: float, rel_tol: float):
        self.fids, self.noise_fid, self.rel_tol = fids, noise_fid, rel_tol
        pair = [v.name for v in SPREAD_PAIR]
        self.spread = abs(fids[pair[0]] - fids[pair[1]]) if all(
            n in fids for n in pair) else None

    def tolerance(self, a: float, b: float) -> float:
        return max(self.rel_tol * min(a, b), self.spread or 0.0)

    def learned(self, *names: str) -> bool:
        """Whether every named variant beats the noise baseline beyond the tolerance."""
        return all(self.fids[n] < self.noise_fid - self.tolerance(self.fids[n], self.noise_fid)
                   for n in names)

    def order(self, a: str, b: str) -> int:
        """-1 if a is better (lower FID) than b beyond the tolerance, 1 if worse, else 0."""
        fa, fb = self.fids[a], self.fids[b]
        if abs(fa - fb) <= self.tolerance(fa, fb):
            return 0
        return -1 if fa < fb else 1

    def part(self, rule: str, names: list[str], decide: Callable[[], str]) -> dict[str, Any]:
        """One part of a claim: ``decide()``'s verdict, unless a variant is missing or did not
        learn (then inconclusive)."""
        missing = [n for n in names if n not in self.fids]
        if missing:
            verdict, rule = "inconclusive", rule + f" [not run: {', '.join(missing)}]"
        elif not self.learned(*names):
            verdict, rule = "inconclusive", rule + " [not all models beat the noise baseline]"
        else:
            verdict = decide()
        return {"verdict": verdict, "rule": rule,
                "fid": {n: self.fids[n] for n in names if n in self.fids}}


def combine(parts: dict[str, dict[str, Any]], **numbers: Any) -> dict[str, Any]:
    """A conjunction of parts: agree if all agree, disagree if any disagrees."""
    verdicts = [p["verdict"] for p in parts.values()]
    verdict = ("disagree" if "disagree" in verdicts else
               "agree" if all(v == "agree" for v in verdicts) else "inconclusive")
    return {"verdict": verdict, "rule": "all parts agree (any disagreeing part disagrees)",
            "parts": parts, **numbers}


def _better_of(judge: Judge, names: list[str]) -> str:
    return min(names, key=lambda n: judge.fids[n])


def claim_patch(judge: Judge, gmacs: dict[str, float]) -> dict[str, Any]:
    """Claim 1 from the patch study's FIDs and GMACs per forward."""
    name = {p: Variant(p).name for p in PATCH_SIZES}
    ratios = {p: gmacs[name[1]] / gmacs[name[p]] for p in PATCH_SIZES[1:]
              if name[1] in gmacs and name[p] in gmacs}
    cost_ok = all(p * p / 2 <= r <= 2 * p * p for p, r in ratios.items())
    parts = {"cost_falls_as_p2": {
        "verdict": "inconclusive" if not ratios else "agree" if cost_ok else "disagree",
        "rule": "GMACs(P=1)/GMACs(P) within [P^2/2, 2 P^2] for P = 2, 4, 8",
        "gmacs_ratio_to_p1": {str(p): r for p, r in ratios.items()}}}
    parts["p4_keeps_quality"] = judge.part(
        "FID(P=4) not worse than FID(P=1)", [name[4], name[1]],
        lambda: "disagree" if judge.order(name[4], name[1]) > 0 else "agree")

    def tradeoff() -> str:
        if judge.order(name[8], name[4]) <= 0:
            return "disagree"
        return "inconclusive" if judge.order(name[4], name[2]) > 0 else "agree"

    parts["p4_best_tradeoff"] = judge.part(
        "agree: FID(4) not worse than FID(2) and FID(8) worse than FID(4); disagree: FID(8) "
        "not worse than FID(4)", [name[2], name[4], name[8]], tradeoff)
    return combine(parts, tolerance_spread=judge.spread, rel_tol=judge.rel_tol)


def claim_objective(judge: Judge) -> dict[str, Any]:
    """Claim 3 from the objective study's FIDs."""
    parts = {}
    for family in ("usual", "sqrt_snr"):
        for p in (1, 4):
            names = {q: Variant(p, q, USUAL_WEIGHTING[q] if family == "usual" else
                                SEED_WEIGHTING).name for q in ("x0", "eps", "v")}

            def decide(names=names) -> str:
                if judge.order(_better_of(judge, [names["x0"], names["v"]]), names["eps"]) < 0:
                    return "agree"
                eps_wins = all(judge.order(names["eps"], names[q]) < 0 for q in ("x0", "v"))
                return "disagree" if eps_wins else "inconclusive"

            parts[f"p{p}_{family}_weighting"] = judge.part(
                "agree: the better of x0 and v beats eps; disagree: eps beats both",
                list(names.values()), decide)
    return combine(parts, tolerance_spread=judge.spread, rel_tol=judge.rel_tol)


def claim_split(judge: Judge) -> dict[str, dict[str, Any]]:
    """Claims 2 (designed split vs its swap) and 4 (split vs single models) from study c."""
    direction = {}
    for hi, lo in DESIGNED_SPLITS:
        designed, swap = Variant((hi, lo)).name, Variant((lo, hi)).name
        direction[f"{designed}_vs_{swap}"] = judge.part(
            "the designed split (coarse P at high noise) not worse than its swap",
            [designed, swap],
            lambda d=designed, s=swap: "disagree" if judge.order(d, s) > 0 else "agree")
    budget = {}
    for kind in ("images", "flops"):
        designed = [Variant(s, budget=kind).name for s in DESIGNED_SPLITS]
        singles = [Variant(1).name, Variant(4, budget=kind).name]

        def decide(designed=designed, singles=singles) -> str:
            order = judge.order(_better_of(judge, designed), _better_of(judge, singles))
            return "agree" if order < 0 else "disagree" if order > 0 else "inconclusive"

        budget[f"equal_{kind}"] = judge.part(
            "the best designed split beats the best single model (P=1 or P=4)",
            designed + singles, decide)
    return {"2_coarse_at_high_noise": combine(direction, tolerance_spread=judge.spread),
            "4_expert_split": combine(budget, tolerance_spread=judge.spread)}


def judge_studies(studies: list[str], fids: dict[str, float], gmacs: dict[str, float],
                  noise_fid: float, rel_tol: float) -> dict[str, dict[str, Any]]:
    """Per study, its claims' verdicts (see the module docstring).

    Args:
      studies: the studies run.
      fids: FID per variant name (at the same N).
      gmacs: GMACs per forward per variant name.
      noise_fid: FID of the uniform-noise baseline at N.
      rel_tol: relative tolerance of FID comparisons.

    Returns:
      {study: {claim: {"verdict", "rule", "parts", ...}}}.
    """
    # A variant without a finite FID (a diverged run) counts as not run.
    judge = Judge({n: f for n, f in fids.items() if math.isfinite(f)}, noise_fid, rel_tol)
    out = {}
    for study in studies:
        if study == "patch":
            out[study] = {"1_patching": claim_patch(judge, gmacs)}
        elif study == "objective":
            out[study] = {"3_objectives": claim_objective(judge)}
        else:
            out[study] = claim_split(judge)
    return out
