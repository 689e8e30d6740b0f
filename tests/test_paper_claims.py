"""benchmarks/paper_claims.py: the smoke size end to end, and the verdict rules on set numbers.

The smoke run trains micro U-Nets for a few steps on 16x16 demo images and scores them with
random Inception weights, so its FIDs mean nothing; the test checks what must hold whatever the
weights: the studies' budgets (equal images, equal FLOPs within one step), the analytic costs,
the floor and the noise baseline, the files. The verdict rules are checked on chosen FIDs.
"""

import contextlib
import ctypes
import glob
import io
import json
import math
import os
import pathlib
import runpy
import sys

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import paper_claims_studies as studies  # noqa: E402
from paper_claims_studies import Variant  # noqa: E402

METRICS = ("fid", "sfid", "precision", "recall")


@contextlib.contextmanager
def one_blas_thread():
    """numpy's bundled OpenBLAS on one thread for the duration (a no-op without one).

    The smoke run scores 7 sample sets (FID and sFID: 2048-d eigendecompositions). On this
    2-core machine under load (test workers, other jobs), OpenBLAS's two threads spin against
    each other and XLA's: 10.8 s per FID instead of 2.7 s on one thread, and a six-variant smoke
    run took 550 s instead of 192 s (load average 5). The thread count is read from the
    environment only when numpy loads, long before this module, hence the library call.
    """
    pattern = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                           "libscipy_openblas*.so*")
    try:
        lib = ctypes.CDLL(glob.glob(pattern)[0])
        get, set_threads = (lib.scipy_openblas_get_num_threads64_,
                            lib.scipy_openblas_set_num_threads64_)
    except (IndexError, OSError, AttributeError):
        yield
        return
    before = get()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(before)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, pathlib.Path]:
    """``paper_claims.py --smoke --out=DIR`` run once in this process; (stdout JSON, DIR)."""
    out = tmp_path_factory.mktemp("paper_claims")
    argv, stdout = sys.argv, sys.stdout
    sys.argv, sys.stdout = ["paper_claims.py", "--smoke", f"--out={out}"], io.StringIO()
    try:
        with one_blas_thread():
            runpy.run_path(str(BENCHMARKS / "paper_claims.py"), run_name="__main__")
        printed = sys.stdout.getvalue()
    finally:
        sys.argv, sys.stdout = argv, stdout
    # json.loads of the WHOLE stdout: anything else printed there fails the test.
    return json.loads(printed), out


def test_smoke_runs_every_variant_and_scores_it_at_the_floors_count(smoke):
    out, directory = smoke
    expected = studies.all_variants(list(studies.STUDIES), smoke=True)
    assert set(out["variants"]) == set(expected) and len(expected) == 5
    assert out["num"] == 16 and out["settings"]["image_size"] == 16
    assert out["data_images"] >= 2 * out["num"]
    for name, row in out["variants"].items():
        for key in METRICS:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["num"] == out["num"] and row["floor"] == out["floor"]
        assert row["sample_steps"] == "3" and row["sampler"] == "ddpm"
        assert row["guidance_scale"] == 1.0 and row["sample_seed"] == 0
        assert row["nonfinite_steps"] == 0 and math.isfinite(row["final_loss"])
        assert row["overrides"] == expected[name].overrides()
        assert (directory / f"{name}.png").stat().st_size > 0
    # The data's other half is nearer the reference than uniform noise is.
    assert 0 < out["floor"]["fid"] < out["noise"]["fid"]
    assert (directory / "paper_claims.png").stat().st_size > 0
    assert json.loads((directory / "paper_claims.json").read_text()) == out


def test_smoke_budgets_equal_images_and_equal_flops(smoke):
    out, _ = smoke
    rows, batch, steps = out["variants"], out["settings"]["batch"], out["settings"]["steps"]
    assert out["budget"]["images"] == steps * batch == 64
    for name, row in rows.items():
        assert row["batch_size"] == batch and row["images_seen"] == row["steps"] * batch
        assert row["train_flops"] == pytest.approx(row["steps"] * row["flops_per_step"])
        if row["budget"] == "images":
            assert row["steps"] == steps, name
        else:  # equal FLOPs: within one step of the budget (the P=1 model's FLOPs)
            assert abs(row["train_flops"] - out["budget"]["flops"]) <= row["flops_per_step"]
    assert rows["p1_x0"]["train_flops"] == pytest.approx(out["budget"]["flops"])
    # The cheap single P=4 model gets more steps at equal FLOPs, the P=4 + P=1 split fewer.
    split = "split_noisy_p4_clean_p1_x0"
    assert rows["p4_x0_flops"]["steps"] > steps > rows[split + "_flops"]["steps"]


def test_smoke_costs_follow_the_patch_size_and_the_split(smoke):
    out, _ = smoke
    rows = out["variants"]
    gmacs = {p: rows[f"p{p}_x0"]["gmacs_per_forward"] for p in (1, 4)}
    assert gmacs[1] > gmacs[4] > 0
    # Every expert trains on every batch: a split's step costs both U-Nets' steps.
    split = rows["split_noisy_p4_clean_p1_x0"]
    assert split["flops_per_step"] == pytest.approx(
        rows["p4_x0"]["flops_per_step"] + rows["p1_x0"]["flops_per_step"])
    assert split["flops_per_step"] == pytest.approx(
        6 * 8 * 1e9 * (gmacs[1] + gmacs[4]))
    # Sampling runs each step on one expert: the mean cost per call lies between the two.
    (clean, noisy) = split["experts"]
    assert (clean["patch_size"], noisy["patch_size"]) == (1, 4)
    assert clean["snr_interval"] == [0.25, "inf"] and noisy["snr_interval"] == [0.0, 0.25]
    assert clean["sampling_steps"] + noisy["sampling_steps"] == 3
    assert gmacs[4] <= split["gmacs_per_forward"] <= gmacs[1]
    # Train and sampling speed are measured for the patch study.
    for p in (1, 4):
        row = rows[f"p{p}_x0"]
        assert row["train_step_s"] > 0 and row["sampler_steps_per_s"] > 0
        assert row["sample_batch_size"] == 16


def test_smoke_claims_are_judged_with_their_rules(smoke):
    out, _ = smoke
    assert set(out["studies"]) == set(studies.STUDIES)
    assert set(out["verdicts"]) == {"1_patching", "3_objectives", "2_coarse_at_high_noise",
                                    "4_expert_split"}
    assert set(out["verdicts"].values()) <= set(studies.VERDICTS)
    cost = out["studies"]["patch"]["claims"]["1_patching"]["parts"]["cost_falls_as_p2"]
    ratios = {int(p): r for p, r in cost["gmacs_ratio_to_p1"].items()}
    assert set(ratios) == {4}
    within = all(p * p / 2 <= r <= 2 * p * p for p, r in ratios.items())
    assert cost["verdict"] == ("agree" if within else "disagree")
    # The smoke size runs no P=2 model: the parts that need one cannot conclude.
    tradeoff = out["studies"]["patch"]["claims"]["1_patching"]["parts"]["p4_best_tradeoff"]
    assert tradeoff["verdict"] == "inconclusive" and "not run: p2_x0, p8_x0" in tradeoff["rule"]


#### Verdict rules on chosen numbers ####


def full_fids(**changes: float) -> dict[str, float]:
    """FID 10 for every variant of the full studies, with changes."""
    fids = {name: 10.0 for name in studies.all_variants(list(studies.STUDIES))}
    fids.update(changes)
    return fids


def test_every_study_deduplicates_shared_variants():
    assert [len(studies.study_variants(s)) for s in studies.STUDIES] == [4, 10, 11]
    # P=1 and P=4 x0 models appear in all three studies, the P=1 model also as the FLOP budget.
    assert len(studies.all_variants(list(studies.STUDIES))) == 22
    assert Variant(4, "x0", studies.USUAL_WEIGHTING["x0"]).name == "p4_x0"
    assert Variant((4, 1), budget="flops").name == "split_noisy_p4_clean_p1_x0_flops"


def test_patch_claim_agrees_disagrees_and_needs_learned_models():
    gmacs = {"p1_x0": 64.0, "p2_x0": 16.0, "p4_x0": 4.0, "p8_x0": 1.0}
    fids = full_fids(p1_x0=10.0, p2_x0=10.5, p4_x0=10.8, p8_x0=20.0, p4_x0_seed1=11.0)
    claim = studies.judge_studies(["patch"], fids, gmacs, 300.0, 0.1)["patch"]["1_patching"]
    assert claim["verdict"] == "agree" and claim["tolerance_spread"] == pytest.approx(0.2)
    # P=8 as good as P=4 (within 10%): P=8 is the better trade-off.
    fids["p8_x0"] = 11.5
    claim = studies.judge_studies(["patch"], fids, gmacs, 300.0, 0.1)["patch"]["1_patching"]
    assert claim["verdict"] == "disagree"
    assert claim["parts"]["p4_best_tradeoff"]["verdict"] == "disagree"
    # A seed spread of 12 makes P=8's 20 vs P=4's 10.8 no difference either.
    fids.update(p8_x0=20.0, p4_x0_seed1=22.8)
    claim = studies.judge_studies(["patch"], fids, gmacs, 300.0, 0.1)["patch"]["1_patching"]
    assert claim["parts"]["p4_best_tradeoff"]["verdict"] == "disagree"
    # Models no better than noise: nothing to conclude about quality.
    fids["p4_x0_seed1"] = 11.0
    claim = studies.judge_studies(["patch"], fids, gmacs, 21.0, 0.1)["patch"]["1_patching"]
    assert claim["verdict"] == "inconclusive"
    assert claim["parts"]["cost_falls_as_p2"]["verdict"] == "agree"
    # A P=8 model costing a quarter of P=1's is no P^2 saving.
    gmacs["p8_x0"] = 16.0
    claim = studies.judge_studies(["patch"], fids, gmacs, 300.0, 0.1)["patch"]["1_patching"]
    assert claim["parts"]["cost_falls_as_p2"]["verdict"] == "disagree"


def test_objective_claim_needs_x0_or_v_to_beat_eps_at_both_patch_sizes():
    eps = {f"p{p}_eps_{w}": 20.0 for p in (1, 4) for w in ("snr", "sqrt_snr")}
    claim = studies.judge_studies(["objective"], full_fids(**eps), {}, 300.0, 0.1)
    assert claim["objective"]["3_objectives"]["verdict"] == "agree"
    # eps better than x0 and v at P=1 with the usual weightings: the conjunction fails.
    eps["p1_eps_snr"] = 5.0
    claim = studies.judge_studies(["objective"], full_fids(**eps), {}, 300.0, 0.1)
    parts = claim["objective"]["3_objectives"]["parts"]
    assert parts["p1_usual_weighting"]["verdict"] == "disagree"
    assert claim["objective"]["3_objectives"]["verdict"] == "disagree"
    # eps between x0 and v (within the tolerance of neither): inconclusive.
    claim = studies.judge_studies(["objective"], full_fids(**{"p4_v_snr+1": 30.0}), {},
                                  300.0, 0.1)
    assert claim["objective"]["3_objectives"]["parts"]["p4_usual_weighting"]["verdict"] == \
        "inconclusive"


def test_split_claims_compare_the_best_designed_split_with_the_best_single_model():
    good = {"split_noisy_p4_clean_p1_x0": 8.0, "split_noisy_p4_clean_p1_x0_flops": 8.5,
            "split_noisy_p1_clean_p4_x0": 12.0}
    claims = studies.judge_studies(["split"], full_fids(**good), {}, 300.0, 0.1)["split"]
    assert claims["4_expert_split"]["verdict"] == "agree"
    assert claims["2_coarse_at_high_noise"]["verdict"] == "agree"
    # At equal FLOPs the splits are worse than the single P=4 model trained longer.
    worse = dict(good, split_noisy_p4_clean_p1_x0_flops=15.0,
                 split_noisy_p4_clean_p2_x0_flops=15.0)
    claims = studies.judge_studies(["split"], full_fids(**worse), {}, 300.0, 0.1)["split"]
    assert claims["4_expert_split"]["parts"]["equal_images"]["verdict"] == "agree"
    assert claims["4_expert_split"]["parts"]["equal_flops"]["verdict"] == "disagree"
    assert claims["4_expert_split"]["verdict"] == "disagree"
    # A diverged (NaN) swap counts as not run.
    claims = studies.judge_studies(["split"], full_fids(split_noisy_p1_clean_p4_x0=math.nan),
                                   {}, 300.0, 0.1)["split"]
    part = claims["2_coarse_at_high_noise"]["parts"][
        "split_noisy_p4_clean_p1_x0_vs_split_noisy_p1_clean_p4_x0"]
    assert part["verdict"] == "inconclusive" and "not run" in part["rule"]


@pytest.mark.parametrize("args, match", [
    (["--smoke", "--studies=patch,nope"], "nope"),
    (["--smoke", "--bogus=1"], "unrecognised argument"),
    (["--size=cpu"], "--inception_path is required"),
])
def test_bad_arguments_fail_before_any_work(args, match, capsys):
    argv = sys.argv
    sys.argv = ["paper_claims.py", *args]
    try:
        with pytest.raises(SystemExit):
            runpy.run_path(str(BENCHMARKS / "paper_claims.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert match in capsys.readouterr().err


def test_an_unknown_data_key_is_refused():
    argv = sys.argv
    sys.argv = ["paper_claims.py", "--smoke", "--data.no_such_key=1"]
    try:
        with pytest.raises(ValueError, match="no_such_key"):
            runpy.run_path(str(BENCHMARKS / "paper_claims.py"), run_name="__main__")
    finally:
        sys.argv = argv
