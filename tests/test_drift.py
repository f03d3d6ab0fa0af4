"""Drift monitoring: test statistics against known answers, calibration, detection on real line conditions,
integrity checks, quality estimates and the reference profile in the bundle (issue 4, sections 1-3 and 5).

The statistics are checked against hand computations and against scipy / statsmodels where they have an answer.
The detector is checked twice: on synthetic Gaussian samples (where "no drift" is exactly true, so the false-alarm
rate can be measured on fresh windows) and on generated radiographs with the small session model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import PROFILE_N_NULL, PROFILE_N_REFERENCE

from reference_impl import data
from reference_impl.monitoring.drift import (
    PSI_EPS,
    DriftDetector,
    Sample,
    benjamini_hochberg,
    bin_fractions,
    frozen_bin_edges,
    joint_thresholds,
    ks_distance_counts,
    ks_pvalues,
    ks_test,
    median_bandwidth,
    mmd2,
    mmd_permutation_pvalue,
    psi,
    psi_band,
    replay_budget,
)


# ----------------------------------------------------------------------------------------------------------------
# PSI on frozen bins
# ----------------------------------------------------------------------------------------------------------------
def test_psi_known_answer() -> None:
    expected = 0.4 * math.log(1.8) + (-0.4) * math.log(0.2)
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(expected, rel=1e-12)
    # Three bins, by hand: sum (c - r) ln(c / r).
    r, c = [0.2, 0.3, 0.5], [0.1, 0.3, 0.6]
    assert psi(r, c) == pytest.approx(-0.1 * math.log(0.5) + 0.1 * math.log(1.2), rel=1e-12)


def test_psi_zero_for_identical_fractions() -> None:
    fractions = np.array([0.1, 0.25, 0.05, 0.6])
    assert psi(fractions, fractions) == 0.0


def test_psi_empty_bins_use_the_eps_floor() -> None:
    value = psi([0.5, 0.5], [1.0, 0.0])
    expected = 0.5 * math.log(1.0 / 0.5) + (PSI_EPS - 0.5) * math.log(PSI_EPS / 0.5)
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-12)
    # An empty *reference* bin is floored as well (production mass where the reference had none).
    assert psi([1.0, 0.0], [0.5, 0.5]) == pytest.approx(expected, rel=1e-12)


def test_psi_bands() -> None:
    assert [psi_band(v) for v in (0.0, 0.099, 0.1, 0.249, 0.25, 3.0)] == [
        "stable",
        "stable",
        "moderate",
        "moderate",
        "major",
        "major",
    ]


def test_frozen_bin_edges_are_open_ended_deciles() -> None:
    sample = np.random.default_rng(0).uniform(size=200_000)
    edges = frozen_bin_edges(sample)
    assert len(edges) == 11
    assert edges[0] == -np.inf and edges[-1] == np.inf
    np.testing.assert_allclose(edges[1:-1], np.linspace(0.1, 0.9, 9), atol=0.005)
    # Each decile bin holds a tenth of the reference.
    np.testing.assert_allclose(bin_fractions(sample, edges), 0.1, atol=1e-3)


def test_frozen_bin_edges_remove_duplicates_for_a_discrete_feature() -> None:
    values = np.repeat([1.0, 2.0, 3.0], 300)  # e.g. a feature with three possible values, equally common
    edges = frozen_bin_edges(values)
    np.testing.assert_array_equal(edges, [-np.inf, 1.0, 2.0, 3.0, np.inf])
    np.testing.assert_allclose(bin_fractions(values, edges), [0.0, 1 / 3, 1 / 3, 1 / 3])
    constant = frozen_bin_edges(np.full(100, 64.0))  # a constant feature (image width): one edge, two bins
    np.testing.assert_array_equal(constant, [-np.inf, 64.0, np.inf])


def test_bin_fractions_include_left_edge_and_values_beyond_the_reference() -> None:
    edges = np.array([-np.inf, 1.0, 2.0, np.inf])
    np.testing.assert_allclose(bin_fractions(np.array([0.5, 1.0, 1.5, 2.0, 100.0]), edges), [0.2, 0.4, 0.4])
    reference_edges = frozen_bin_edges(np.random.default_rng(1).uniform(size=1000))
    far = np.array([-1e9, -5.0, 0.5, 7.0, 1e9, np.inf])
    fractions = bin_fractions(far, reference_edges)
    assert fractions.sum() == pytest.approx(1.0)
    assert fractions[0] == pytest.approx(2 / 6) and fractions[-1] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------------------------------------------
# KS with a multiple-testing correction
# ----------------------------------------------------------------------------------------------------------------
def test_ks_pvalues_equal_scipy_per_column() -> None:
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(2)
    ref = rng.normal(size=(300, 4))
    cur = rng.normal(size=(80, 4)) + np.array([0.0, 0.3, 1.0, 0.0])
    cur[:, 3] = np.round(cur[:, 3])  # ties
    expected = [ks_2samp(ref[:, j], cur[:, j]).pvalue for j in range(4)]
    np.testing.assert_allclose(ks_pvalues(ref, cur), expected, rtol=1e-12)
    assert ks_pvalues(ref, cur)[2] < 1e-6  # the shifted column


def test_ks_distance_from_counts_equals_scipy_with_ties_and_repeats() -> None:
    """The replay's vectorised KS distance is scipy's, for windows that repeat pool items (drawn with replacement)."""
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(12)
    for reference, pool in [
        (rng.normal(size=300), rng.normal(size=60) + 0.2),  # continuous
        (rng.integers(0, 5, 300).astype(float), rng.integers(0, 7, 60).astype(float)),  # ties everywhere
    ]:
        draws = rng.integers(0, len(pool), (8, 40))
        counts = np.stack([np.bincount(d, minlength=len(pool)) for d in draws]).astype(float)
        expected = [ks_2samp(reference, pool[d]).statistic for d in draws]
        np.testing.assert_allclose(ks_distance_counts(reference, pool, counts), expected, atol=1e-12)
    distance, p_value = ks_test(reference[:, None], pool[draws[0]][:, None])
    assert distance.shape == p_value.shape == (1,)
    assert p_value[0] == pytest.approx(ks_2samp(reference, pool[draws[0]]).pvalue)


def test_benjamini_hochberg_equals_statsmodels_including_ties() -> None:
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(3)
    for trial in range(20):
        p = rng.uniform(size=12) ** 3  # skewed towards small values so several are "significant"
        p[3] = p[7] = p[11]  # ties
        p[0] = p[1]
        if trial % 2:
            p[5] = 1.0
        expected = multipletests(p, method="fdr_bh")[1]
        np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12)
    # By hand: sorted 0.01, 0.03, 0.04, 0.2 -> p * 4 / rank = 0.04, 0.06, 0.0533, 0.2 -> running min from the top.
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03, 0.2]), [0.04, 0.16 / 3, 0.16 / 3, 0.2])


# ----------------------------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------------------------
def _mmd2_by_hand(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    def k(a: np.ndarray, b: np.ndarray) -> float:
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * bandwidth**2))

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd2_matches_the_unbiased_formula_and_is_symmetric() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(7, 3)) + 0.5
    assert mmd2(x, y, 1.3) == pytest.approx(_mmd2_by_hand(x, y, 1.3), rel=1e-9)
    assert mmd2(x, y, 1.3) == pytest.approx(mmd2(y, x, 1.3), rel=1e-12)


def test_mmd2_leaves_out_pairs_of_copies() -> None:
    rng = np.random.default_rng(13)
    x, pool = rng.normal(size=(9, 3)), rng.normal(size=(6, 3))
    ids = np.array([0, 1, 1, 2, 5, 5, 5])
    y = pool[ids]
    # By hand: the y-y average runs over pairs of *different* pool items only.
    pairs = [(i, j) for i in range(len(ids)) for j in range(len(ids)) if ids[i] != ids[j]]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * 1.3**2))

    kxx = sum(k(x[i], x[j]) for i in range(9) for j in range(9) if i != j) / 72
    kyy = sum(k(y[i], y[j]) for i, j in pairs) / len(pairs)
    kxy = sum(k(a, b) for a in x for b in y) / (9 * len(y))
    assert mmd2(x, y, 1.3, y_ids=ids) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-9)
    # Without repeats, ids change nothing.
    assert mmd2(x, pool, 1.3, y_ids=np.arange(6)) == pytest.approx(mmd2(x, pool, 1.3), rel=1e-12)


def test_mmd2_near_zero_for_the_same_distribution_and_larger_when_shifted() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    shifted = rng.normal(size=(300, 4)) + np.array([1.0, 0.0, 0.0, 0.0])
    bw = median_bandwidth(np.concatenate([x, y]))
    same, moved = mmd2(x, y, bw), mmd2(x, shifted, bw)
    assert abs(same) < 0.005
    assert moved > 0.05
    assert moved > 10 * abs(same)


def test_median_bandwidth_known_distances() -> None:
    # Points 0, 1, 3 on a line: pairwise distances 1, 3, 2 -> median 2.
    assert median_bandwidth(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)
    # Corners of a 2x2 square: four sides of 2 and two diagonals of 2*sqrt(2) -> median 2.
    square = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert median_bandwidth(square) == pytest.approx(2.0)
    assert median_bandwidth(np.zeros((5, 3))) == 1.0  # degenerate sample: a usable fallback, not a zero width


def test_mmd_permutation_pvalue_is_roughly_uniform_under_the_null() -> None:
    pvalues = []
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        x, y = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))
        pvalues.append(mmd_permutation_pvalue(x, y, median_bandwidth(x), n_perm=99, seed=seed))
    pvalues = np.array(pvalues)
    assert np.mean(pvalues < 0.05) <= 0.15
    assert 0.3 < np.median(pvalues) < 0.7  # neither stuck at 1 nor piled up near 0


def test_mmd_permutation_pvalue_is_small_for_a_shift_and_never_zero() -> None:
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(60, 3)), rng.normal(size=(60, 3)) + 1.5
    p = mmd_permutation_pvalue(x, y, median_bandwidth(x), n_perm=199)
    assert p < 0.02
    assert p == pytest.approx(1 / 200)  # the +1 correction: the observed split counts as one permutation


# ----------------------------------------------------------------------------------------------------------------
# The detector on synthetic samples: calibration and power
# ----------------------------------------------------------------------------------------------------------------
FEATURES = ("f0", "f1", "f2", "f3", "f4")
CLASSES = ("a", "b", "c", "d")


def synthetic(rng: np.random.Generator, n: int, feature_shift: float = 0.0, shifted: int = 2) -> Sample:
    features = rng.normal(size=(n, len(FEATURES)))
    features[:, shifted] += feature_shift
    logits = 2.0 * rng.normal(size=(n, len(CLASSES)))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return Sample(features, probs / probs.sum(axis=1, keepdims=True), rng.normal(size=(n, 8)))


@pytest.fixture(scope="module")
def synthetic_detector() -> DriftDetector:
    rng = np.random.default_rng(7)
    detector = DriftDetector(synthetic(rng, 600), synthetic(rng, 1200), FEATURES, CLASSES, alpha=0.05)
    detector.calibrate(50)
    return detector


def test_calibration_holds_the_false_alarm_rate_on_fresh_null_windows(synthetic_detector: DriftDetector) -> None:
    report = synthetic_detector.calibration[50]
    assert report["measured_false_alarm_rate"] <= 0.1
    assert report["target_false_alarm_rate"] == 0.05
    rng = np.random.default_rng(8)
    results = [synthetic_detector.check(synthetic(rng, 50)) for _ in range(100)]
    assert sum(r.drifted for r in results) <= 10
    for family in ("psi", "ks", "mmd", "bbsd"):  # no single family eats the whole budget
        assert sum(r.families[family] for r in results) <= 6, family


def test_detects_a_mean_shift_and_names_the_feature_first(synthetic_detector: DriftDetector) -> None:
    rng = np.random.default_rng(9)
    results = [synthetic_detector.check(synthetic(rng, 50, feature_shift=1.5, shifted=3)) for _ in range(20)]
    assert all(r.drifted for r in results)
    assert all(r.moved_features()[0] == "f3" for r in results)
    assert all(r.families["ks"] for r in results)
    # The shift is in the features only: the model-side families have no reason to fire on most windows.
    assert sum(r.families["mmd"] for r in results) <= 4


def test_thresholds_are_cached_per_window_size(synthetic_detector: DriftDetector) -> None:
    thresholds = synthetic_detector.thresholds[50]
    calibration = synthetic_detector.calibration[50]
    assert synthetic_detector.calibrate(50) is thresholds  # not recomputed
    assert synthetic_detector.calibration[50] is calibration
    result = synthetic_detector.check(synthetic(np.random.default_rng(10), 150))
    assert set(synthetic_detector.thresholds) >= {50, 150}
    assert result.thresholds == synthetic_detector.thresholds[150]
    # Every statistic is noisier on small windows, so its replayed threshold must be higher there.
    for family in ("psi", "ks", "bbsd", "mmd"):
        assert synthetic_detector.thresholds[50][family] > synthetic_detector.thresholds[150][family], family


def test_joint_calibration_keeps_any_family_within_the_budget_on_the_replayed_windows(
    synthetic_detector: DriftDetector,
) -> None:
    report = synthetic_detector.calibration[50]
    n = report["replayed_windows"]
    assert n >= 1000
    budget = replay_budget(n, 0.05)
    assert report["replayed_false_alarm_rate"] <= budget / n <= 0.05
    # One common tail level: no family fires on more replayed windows than it allows, and the families together
    # use most of the budget (the level is the largest that fits, so the next one up would overshoot it).
    for family, rate in report["replayed_by_family"].items():
        assert rate <= report["tail_level"] + 1e-12, family
    assert report["replayed_false_alarm_rate"] >= 0.5 * budget / n
    assert report["with_replacement"] and report["method"] == "joint replay"


def test_replay_budget_is_an_upper_confidence_bound() -> None:
    from scipy.stats import beta

    assert replay_budget(1000, 0.05) == 38  # 3.8% of the windows, not 5%: the rate is held below alpha, not at it
    for n, alpha in [(1000, 0.05), (400, 0.1), (5000, 0.01)]:
        b = replay_budget(n, alpha)
        assert beta.ppf(0.95, b + 1, n - b) <= alpha < beta.ppf(0.95, b + 2, n - b - 1)
    assert replay_budget(20, 0.05) == 0  # too few windows to certify any alarm at all


def test_joint_thresholds_measure_the_overlap_between_families() -> None:
    rng = np.random.default_rng(14)
    a = rng.normal(size=1000)
    # Identical families always fire together: each may use the whole budget.
    thresholds, k = joint_thresholds({"psi": a, "ks": 2 * a}, budget=40)
    assert k == 40
    assert np.sum((a > thresholds["psi"]) | (2 * a > thresholds["ks"])) == 40
    # Independent families barely overlap: they share the budget, about a quarter each for four.
    independent = {f: rng.normal(size=1000) for f in ("psi", "ks", "mmd", "bbsd")}
    thresholds, k = joint_thresholds(independent, budget=40)
    fired = np.any([independent[f] > thresholds[f] for f in independent], axis=0)
    assert fired.sum() <= 40
    assert 8 <= k <= 12
    for f, v in independent.items():
        assert np.sum(v > thresholds[f]) == k  # ties aside, each family fires on exactly k windows


def test_replay_computes_the_same_statistics_as_the_check(synthetic_detector: DriftDetector) -> None:
    """Calibration replays a vectorised copy of the check: the same numbers, or the thresholds mean nothing."""
    det = synthetic_detector
    rng = np.random.default_rng(15)
    pool = rng.permutation(len(det.null_pool))[:500]
    draws = rng.integers(0, len(pool), (3, 80))
    replayed = det._replay(pool, draws)
    for w, d in enumerate(draws):
        window = det.null_pool.take(pool[d])
        result = det.check(window)
        assert replayed["psi"][w] == pytest.approx(result.statistics["psi"], rel=1e-9)
        assert replayed["ks"][w] == pytest.approx(result.statistics["ks"], abs=1e-12)
        assert replayed["bbsd"][w] == pytest.approx(result.statistics["bbsd"], abs=1e-12)
        # The check's MMD² on a window with repeated images counts the copies; the replay leaves them out.
        assert replayed["mmd"][w] == pytest.approx(
            mmd2(det.mmd_ref, window.embeddings, det.bandwidth, y_ids=d), abs=1e-9
        )
        assert max(result.ks_distance.values()) == result.statistics["ks"]
        assert 0 < result.mmd_p_value <= 1  # the permutation p-value is still reported


def test_false_alarm_rate_on_fresh_windows_holds_at_a_large_window() -> None:
    """The frozen-reference problem: with nominal p-values, large windows alarm too often on normal data.

    Window 400 against a reference of 600: the replay is conditional on this one reference, so windows of fresh
    no-drift data (never in the null pool) must stay within the budget; a rate measured on 150 windows at a true
    5% would exceed 0.1 less than 1% of the time.
    """
    rng = np.random.default_rng(16)
    detector = DriftDetector(synthetic(rng, 600), synthetic(rng, 1200), FEATURES, CLASSES, alpha=0.05)
    results = [detector.check(synthetic(rng, 400)) for _ in range(150)]
    assert sum(r.drifted for r in results) / len(results) <= 0.1
    assert detector.calibration[400]["measured_false_alarm_rate"] <= 0.1


def test_moved_features_order_is_reproducible_for_saturated_psi() -> None:
    from reference_impl.monitoring.drift import DriftResult

    psi_max = 8.283
    result = DriftResult(
        n=100,
        drifted=True,
        families={"psi": True, "ks": True, "mmd": True, "bbsd": True},
        statistics={},
        thresholds={"ks": 0.2},
        psi={"noise": psi_max, "sharpness": psi_max, "brightness": 0.5, "contrast": 0.01},
        psi_bands={"noise": "major", "sharpness": "major", "brightness": "major", "contrast": "stable"},
        ks_distance={"noise": 1.0, "sharpness": 1.0, "brightness": 0.3, "contrast": 0.05},
        feature_shift={"noise": 2.5, "sharpness": 9.0, "brightness": 0.1, "contrast": 0.0},
    )
    assert result.moved_features() == ["sharpness", "noise", "brightness"]


# ----------------------------------------------------------------------------------------------------------------
# Real radiographs: the profile of the small session model
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def profile(profile_bundle: Path):
    from reference_impl.monitoring.profile import ReferenceProfile

    return ReferenceProfile.load(profile_bundle)


@pytest.fixture(scope="module")
def predictor(profile_bundle: Path):
    from reference_impl.inference import Predictor

    return Predictor.from_path(profile_bundle, device="cpu")


@pytest.fixture(scope="module")
def detector(profile) -> DriftDetector:
    return profile.detector(alpha=0.05)


@pytest.fixture(scope="module")
def fresh_baseline():
    """Baseline radiographs the model, the reference and the null pool never saw."""
    from reference_impl import data

    return data.generate(1000, seed=41)


def _window(profile, predictor, images: np.ndarray) -> Sample:
    pred = predictor.predict(images, with_embeddings=True)
    return profile.sample_of(images, pred.probabilities, pred.embeddings)


def test_baseline_windows_are_mostly_not_drifted(profile, predictor, detector, fresh_baseline) -> None:
    sample = _window(profile, predictor, fresh_baseline.images[:500])
    results = [detector.check(sample.take(np.arange(i, i + 100))) for i in range(0, 500, 100)]
    assert sum(r.drifted for r in results) <= 1
    assert detector.calibration[100]["measured_false_alarm_rate"] <= 0.1


@pytest.mark.parametrize(
    ("condition", "expected_moved"),
    [("new_camera", {"noise", "sharpness"}), ("new_lighting", {"brightness"}), ("new_material", set())],
)
def test_line_conditions_at_high_severity_are_detected(profile, predictor, detector, condition, expected_moved) -> None:
    from reference_impl import data

    shifted = data.generate(100, seed=42, condition=condition, severity=0.8)
    result = detector.check(_window(profile, predictor, shifted.images))
    assert result.drifted
    moved = result.moved_features()
    assert moved, "a drifted window must say which features moved"
    assert expected_moved <= set(moved)
    if condition == "new_camera":
        assert set(moved[:2]) == {"noise", "sharpness"}  # the camera's signature: noise up, detail changed
        assert result.feature_shift["noise"] > 0.5  # median noise up by more than half
    if condition == "new_lighting":
        assert result.psi_bands["brightness"] == "major"


def test_estimated_accuracy_tracks_true_accuracy_on_baseline(profile, predictor, fresh_baseline) -> None:
    from reference_impl.monitoring.quality import estimated_accuracy

    pred = predictor.predict(fresh_baseline.images)
    true_accuracy = float((pred.class_index == fresh_baseline.labels).mean())
    estimate = estimated_accuracy(pred.probabilities, profile.temperature)
    raw = float(pred.probabilities.max(axis=1).mean())
    assert abs(estimate - true_accuracy) <= 0.05
    assert abs(estimate - true_accuracy) < abs(raw - true_accuracy)  # calibration helps


# ----------------------------------------------------------------------------------------------------------------
# Integrity
# ----------------------------------------------------------------------------------------------------------------
EXPECTED = {"widths": [64], "heights": [64], "bit_depths": [8], "formats": ["png"]}


def _rows(n: int, **overrides) -> list[dict]:
    base = {"width": 64, "height": 64, "bit_depth": 8, "input_format": "png"}
    return [{**base, **overrides, "ts": 1000.0 + 6.0 * i} for i in range(n)]  # 10 rows per minute


def test_integrity_clean_window() -> None:
    from reference_impl.monitoring.integrity import check_window

    report = check_window(_rows(50), EXPECTED)
    assert report["failures"] == 0
    assert report["formats_seen"] == {"png": 50} and report["sizes_seen"] == {"64x64": 50}
    assert report["rate_per_min"] == pytest.approx(50 / (49 * 6 / 60))
    assert report["volume_ratio"] is None  # no previous window to compare with


def test_integrity_flags_size_bit_depth_format_and_unreadable() -> None:
    from reference_impl.monitoring.integrity import check_window

    rows = _rows(40)
    for r in rows[:3]:
        r.update(width=128, height=128)
    for r in rows[3:5]:
        r.update(bit_depth=16)
    for r in rows[5:9]:
        r.update(input_format="tiff")
    rows[9]["input_format"] = None  # a tensor input (v2): no file format to check
    rows[10].update(width=128, height=128, bit_depth=16, input_format="tiff")  # one image breaking three rules
    report = check_window(rows, EXPECTED, unreadable=2, rejected=1)
    assert report["size_mismatch"] == 3 + 1
    assert report["bit_depth_mismatch"] == 2 + 1
    assert report["format_mismatch"] == 4 + 1
    assert report["unreadable"] == 2 and report["rejected"] == 1
    assert report["failures"] == 3 + 2 + 4 + 1 + 2 + 1, "inputs that failed, each once (not 13 rule violations)"
    assert report["tensor_inputs"] == 1
    assert report["formats_seen"] == {"png": 34, "tiff": 5, "tensor": 1}
    assert report["bit_depths_seen"] == {"8": 37, "16": 3}
    assert report["sizes_seen"]["128x128"] == 4


def test_integrity_volume_ratio() -> None:
    from reference_impl.monitoring.integrity import check_window

    report = check_window(_rows(101), EXPECTED, previous_rate_per_min=20.0)  # 10 per minute now
    assert report["rate_per_min"] == pytest.approx(10.1)
    assert report["volume_ratio"] == pytest.approx(10.1 / 20.0)


def test_profile_expects_what_the_reference_looked_like(profile) -> None:
    from reference_impl.monitoring.integrity import check_window

    assert profile.expected["widths"] == [64] and profile.expected["heights"] == [64]
    assert profile.expected["bit_depths"] == [8]
    # A new camera writing 16-bit TIFFs instead of 8-bit PNGs is flagged twice per image.
    report = check_window(_rows(10, bit_depth=16, input_format="tiff"), profile.expected)
    assert report["bit_depth_mismatch"] == 10 and report["format_mismatch"] == 10


# ----------------------------------------------------------------------------------------------------------------
# Quality: temperature scaling and measured quality
# ----------------------------------------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


@pytest.mark.parametrize("t_true", [3.0, 0.5])
def test_fit_temperature_recovers_a_known_temperature(t_true: float) -> None:
    from reference_impl.monitoring.quality import fit_temperature, temper

    rng = np.random.default_rng(11)
    z = 1.5 * rng.normal(size=(8000, 4))
    calibrated = _softmax(z)
    labels = np.array([rng.choice(4, p=p) for p in calibrated])  # labels drawn from the calibrated probabilities
    # temper(p, T) = softmax(log p / T): a model whose logits are T_true times too large needs T = T_true.
    miscalibrated = _softmax(z * t_true)
    fitted = fit_temperature(miscalibrated, labels)
    assert fitted == pytest.approx(t_true, rel=0.1)
    assert _nll(temper(miscalibrated, fitted), labels) < _nll(miscalibrated, labels) - 0.01
    np.testing.assert_allclose(temper(miscalibrated, t_true), calibrated, atol=1e-6)
    # Temperature never changes a prediction, only the confidence.
    np.testing.assert_array_equal(temper(miscalibrated, fitted).argmax(1), miscalibrated.argmax(1))


def test_estimated_accuracy_of_a_calibrated_model() -> None:
    from reference_impl.monitoring.quality import estimated_accuracy

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    assert estimated_accuracy(probs, 1.0) == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    assert math.isnan(estimated_accuracy(np.zeros((0, 2)), 1.0))


def test_measured_quality_hand_example() -> None:
    from reference_impl.monitoring.quality import measured_quality

    classes = ("good", "porosity", "crack", "lack_of_fusion")
    predicted = ["good", "good", "good", "crack", "porosity", "crack"]
    true = ["good", "good", "crack", "crack", "porosity", "lack_of_fusion"]
    q = measured_quality(predicted, true, classes)
    assert q["n_labelled"] == 6
    assert q["accuracy"] == pytest.approx(4 / 6)
    # Recall = share of each TRUE class found (precision would give good 2/3 and crack 1/2).
    assert q["recall"] == {"good": 1.0, "porosity": 1.0, "crack": 0.5, "lack_of_fusion": 0.0}
    assert measured_quality(["good", "crack"], ["good", "good"], classes)["recall"] == {"good": 0.5}  # none else
    assert measured_quality([], [], classes) == {"n_labelled": 0, "accuracy": None, "recall": {}}


# ----------------------------------------------------------------------------------------------------------------
# The reference profile in the bundle
# ----------------------------------------------------------------------------------------------------------------
def test_profile_round_trip(profile, tmp_path: Path) -> None:
    from reference_impl.monitoring.profile import PROFILE_JSON, PROFILE_NPZ, ReferenceProfile

    files = profile.to_files()
    assert set(files) == {PROFILE_JSON, PROFILE_NPZ, "monitoring/ood.json"}
    for rel, payload in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(payload)
    loaded = ReferenceProfile.load(tmp_path)
    for part in ("reference", "null_pool"):
        for array in ("features", "probs", "embeddings"):
            np.testing.assert_array_equal(getattr(getattr(loaded, part), array), getattr(getattr(profile, part), array))
    for array in ("mean", "components", "explained"):
        np.testing.assert_array_equal(getattr(loaded.pca, array), getattr(profile.pca, array))
    assert loaded.feature_names == profile.feature_names
    assert loaded.class_names == profile.class_names
    assert loaded.temperature == profile.temperature
    assert loaded.expected == profile.expected
    assert loaded.reference_accuracy == profile.reference_accuracy


def test_profile_contents(profile) -> None:
    from reference_impl.monitoring.features import DRIFT_FEATURES

    assert profile.feature_names == DRIFT_FEATURES
    assert profile.reference.features.shape == (PROFILE_N_REFERENCE, len(DRIFT_FEATURES))
    assert len(profile.null_pool) == PROFILE_N_NULL
    assert profile.reference.embeddings.shape[1] <= 32  # PCA-reduced
    np.testing.assert_allclose(profile.reference.probs.sum(axis=1), 1.0, atol=1e-5)
    assert 0.05 <= profile.temperature <= 20 and profile.temperature != 1.0  # fitted, not the default
    assert 0.5 < profile.reference_accuracy <= 1.0
    # Held-out reference, separate null pool: not the same images.
    assert not np.array_equal(profile.reference.features[:50], profile.null_pool.features[:50])


def test_bundle_with_profile_verifies_and_lists_the_profile(profile_bundle: Path) -> None:
    from reference_impl.monitoring.profile import PROFILE_JSON, PROFILE_NPZ
    from reference_impl.packaging import MANIFEST, load_bundle, verify_bundle

    bundle = load_bundle(profile_bundle)  # verifies every hash
    assert bundle.path == profile_bundle
    manifest_text = (profile_bundle / MANIFEST).read_text()
    assert PROFILE_JSON in manifest_text and PROFILE_NPZ in manifest_text
    files = verify_bundle(profile_bundle)
    assert {PROFILE_JSON, PROFILE_NPZ} <= set(files)
    meta = json.loads((profile_bundle / PROFILE_JSON).read_text())
    assert meta["n_reference"] == PROFILE_N_REFERENCE and meta["n_null"] == PROFILE_N_NULL
    with np.load(profile_bundle / PROFILE_NPZ, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_profile_loads_without_pickles(profile, tmp_path: Path) -> None:
    """A profile.npz carrying a pickled object array is refused (loading it could run code)."""
    import io

    from reference_impl.monitoring.profile import PROFILE_JSON, PROFILE_NPZ, ReferenceProfile

    files = profile.to_files()
    (tmp_path / "monitoring").mkdir()
    (tmp_path / PROFILE_JSON).write_bytes(files[PROFILE_JSON])
    with np.load(io.BytesIO(files[PROFILE_NPZ]), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["ref_features"] = np.array([{"not": "an array of numbers"}], dtype=object)
    np.savez(tmp_path / PROFILE_NPZ, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        ReferenceProfile.load(tmp_path)


def test_profile_error_for_a_bundle_without_profile(bundle_dir: Path, tmp_path: Path) -> None:
    from reference_impl.monitoring.profile import PROFILE_JSON, ProfileError, ReferenceProfile

    with pytest.raises(ProfileError, match="no monitoring profile"):
        ReferenceProfile.load(bundle_dir)
    (tmp_path / "monitoring").mkdir()
    (tmp_path / PROFILE_JSON).write_text(json.dumps({"profile_version": 99}))
    (tmp_path / "monitoring" / "profile.npz").write_bytes(b"")
    with pytest.raises(ProfileError, match="version 99"):
        ReferenceProfile.load(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# The per-image out-of-distribution score (monitoring/ood.py)
# ----------------------------------------------------------------------------------------------------------------
def _ood_flags(bundle: Path, images: np.ndarray) -> np.ndarray:
    from reference_impl.inference import Predictor
    from reference_impl.monitoring.ood import OODDetector, input_features

    predictor = Predictor.from_path(bundle, device="cpu")
    detector = OODDetector.load(bundle)
    assert detector is not None, "package_with_profile puts monitoring/ood.json into the bundle"
    x = predictor.preprocess(images)
    _, emb = predictor.forward(x, with_embeddings=True)
    spec = predictor.bundle.preprocess
    return detector.scores(emb.numpy(), input_features(x, spec.mean, spec.std)) > 1.0


def test_ood_flags_about_the_calibrated_share_of_new_normal_images(profile_bundle: Path) -> None:
    from reference_impl.monitoring.ood import OODDetector

    detector = OODDetector.load(profile_bundle)
    assert detector.false_flag_rate == 0.01 and detector.calibration_images == PROFILE_N_NULL
    rate = _ood_flags(profile_bundle, data.generate(2000, seed=4242).images).mean()
    # calibrated on 800 null-pool images to 1 %; the bound leaves room for that estimate's own sampling error
    assert rate <= 0.03, f"{rate:.1%} of new baseline images flagged (calibrated to 1 %)"


def test_ood_flags_images_that_are_not_weld_radiographs(profile_bundle: Path) -> None:
    others = data.not_welds(120, seed=3)
    assert len(data.sample_photographs()) >= 1, "matplotlib ships at least one photograph"
    flags = _ood_flags(profile_bundle, others)
    assert flags[0::2].mean() >= 0.95, f"photographs: {flags[0::2].mean():.0%} flagged"
    assert flags[1::2].mean() >= 0.95, f"synthetic textures: {flags[1::2].mean():.0%} flagged"


def test_ood_detector_round_trips_and_refuses_nonsense(profile_bundle: Path, tmp_path: Path) -> None:
    from reference_impl.monitoring.ood import OOD_JSON, OODDetector

    detector = OODDetector.load(profile_bundle)
    (tmp_path / "monitoring").mkdir()
    (tmp_path / OOD_JSON).write_bytes(detector.to_files()[OOD_JSON])
    again = OODDetector.load(tmp_path)
    rng = np.random.default_rng(0)
    emb, feats = rng.random((5, len(detector.embedding_mean))), rng.random((5, 5))
    assert np.array_equal(again.scores(emb, feats), detector.scores(emb, feats))
    assert OODDetector.load(tmp_path / "old-bundle") is None, "a bundle packaged before the detector: no score"
    assert detector.scores(emb[:0], feats[:0]).shape == (0,)
    with pytest.raises(ValueError, match="false_flag_rate"):
        OODDetector.fit((emb, feats), (emb, feats), false_flag_rate=0.0)


def test_image_features_of_an_image_thinner_than_3_pixels_are_finite() -> None:
    """The server answers a 2x2 image (it is resized); its logged statistics must not be NaN."""
    from reference_impl.monitoring.features import image_features

    feats = image_features([np.full((2, 2), 100, np.uint8), np.zeros((1, 64), np.uint8)])
    assert all(np.isfinite(values).all() for values in feats.values())
    assert feats["sharpness"].tolist() == [0.0, 0.0] and feats["brightness"][0] == pytest.approx(100 / 255)
