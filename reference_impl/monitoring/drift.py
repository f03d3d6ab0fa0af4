"""Drift tests and their calibration. Chapter: "Monitoring in production" (data drift, alert thresholds).

Four families of test, each answering "does this window of production images look like the reference?":

- **PSI** (population stability index) per interpretable feature, on the reference's *frozen* decile bins;
- **KS** (Kolmogorov-Smirnov) per feature, with a Benjamini-Hochberg correction because we test several features
  at once (without it, 5 features at 5% each would alarm ~23% of the time on perfectly normal data);
- **MMD** (maximum mean discrepancy) between the model's embeddings, a kernel two-sample test that sees shifts no
  single hand-picked feature captures (permutation p-value);
- **BBSD** (black-box shift detection): KS on the model's softmax outputs, which moves when the inputs move in ways
  that matter *to the model*.

Why calibrate? Textbook cut-offs (PSI 0.1 / 0.25) ignore the window size: with 50 images PSI is noisy and 0.1
fires constantly; with 1,000 it is smooth and 0.25 misses real drift. The four families share the policy's
false-alarm budget (5% by default; Bonferroni: alpha/4 each) so that "any test fires" stays within it. Tests with
exact p-values use alpha/4 directly; PSI's threshold is set by *replaying* windows drawn from held-out baseline
data (the null pool, saved in the bundle). Then the false-alarm rate is *measured* on windows the calibration never
saw. The PSI bands are still reported because people know them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FAMILIES = ("psi", "ks", "mmd", "bbsd")
PSI_EPS = 1e-4  # floor for empty bins: ln(0) is undefined, and an empty bin should count as "very different"


# ----------------------------------------------------------------------------------------------------- PSI
def frozen_bin_edges(reference: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Decile edges of a reference feature, open-ended at both sides, duplicates removed.

    We compute PSI ourselves instead of using a library's PSI because the bins must be *frozen* at packaging time:
    libraries re-bin per call (often on the pooled data or with equal-width bins), which makes today's PSI
    incomparable with last week's and can hide a shift that moves mass into the tails.
    """
    inner = np.quantile(reference, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.concatenate([[-np.inf], np.unique(inner), [np.inf]])


def bin_fractions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin ``[edges[i], edges[i+1])``."""
    idx = np.searchsorted(edges, values, side="right") - 1
    counts = np.bincount(np.clip(idx, 0, len(edges) - 2), minlength=len(edges) - 1)
    return counts / max(len(values), 1)


def psi(reference_fractions: np.ndarray, current_fractions: np.ndarray, eps: float = PSI_EPS) -> float:
    """PSI = sum over bins of (current - reference) * ln(current / reference), with empty bins floored at eps."""
    r = np.maximum(np.asarray(reference_fractions, dtype=float), eps)
    c = np.maximum(np.asarray(current_fractions, dtype=float), eps)
    return float(np.sum((c - r) * np.log(c / r)))


def psi_band(value: float, warn: float = 0.1, alert: float = 0.25) -> str:
    """The conventional reading: < 0.1 stable, 0.1-0.25 moderate shift, >= 0.25 major shift."""
    return "major" if value >= alert else "moderate" if value >= warn else "stable"


# ------------------------------------------------------------------------------------------------------ KS
def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """BH-adjusted p-values (controls the false discovery rate across the features tested together)."""
    p = np.asarray(p_values, dtype=float)
    n = len(p)
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def ks_pvalues(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Two-sample KS p-value per column of ``(n, d)`` arrays (scipy's exact/asymptotic choice)."""
    from scipy.stats import ks_2samp

    return np.array([ks_2samp(reference[:, j], current[:, j]).pvalue for j in range(reference.shape[1])])


# ----------------------------------------------------------------------------------------------------- MMD
def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def median_bandwidth(x: np.ndarray) -> float:
    """The median heuristic: kernel width = median pairwise distance of the pooled sample."""
    d = _sq_dists(x, x)
    med = np.median(d[np.triu_indices_from(d, k=1)])
    return float(np.sqrt(med)) if med > 0 else 1.0


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased estimate of squared MMD with a Gaussian kernel."""
    gamma = 1.0 / (2 * bandwidth**2)
    kxx, kyy, kxy = np.exp(-gamma * _sq_dists(x, x)), np.exp(-gamma * _sq_dists(y, y)), np.exp(-gamma * _sq_dists(x, y))
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def mmd_permutation_pvalue(x: np.ndarray, y: np.ndarray, bandwidth: float, n_perm: int = 200, seed: int = 0) -> float:
    """Permutation p-value of MMD (exact under the null, whatever the data: no distribution theory needed).

    Uses the V-statistic w'Kw with w = +1/m for one sample and -1/n for the other; all permutations are scored
    with one matrix product, so 200 permutations cost milliseconds rather than seconds.
    """
    pooled = np.concatenate([x, y])
    k = np.exp(-_sq_dists(pooled, pooled) / (2 * bandwidth**2))
    m, n = len(x), len(y)
    rng = np.random.default_rng(seed)
    member = np.zeros((m + n, n_perm + 1), dtype=bool)
    member[:m, 0] = True  # column 0: the observed split
    for j in range(1, n_perm + 1):
        member[rng.permutation(m + n)[:m], j] = True
    w = np.where(member, 1.0 / m, -1.0 / n)
    stats = np.einsum("ip,ip->p", w, k @ w)
    return float((1 + np.sum(stats[1:] >= stats[0])) / (n_perm + 1))


# ------------------------------------------------------------------------------------------- the detector
@dataclass
class Sample:
    """What the tests look at for a set of images: feature matrix, softmax probabilities, PCA'd embeddings."""

    features: np.ndarray  # (n, n_features)
    probs: np.ndarray  # (n, n_classes)
    embeddings: np.ndarray  # (n, k)

    def __len__(self) -> int:
        return len(self.features)

    def take(self, idx: np.ndarray) -> Sample:
        return Sample(self.features[idx], self.probs[idx], self.embeddings[idx])


@dataclass
class DriftResult:
    """Every number of one window's drift check, and the verdict."""

    n: int
    drifted: bool
    families: dict[str, bool]  # family -> fired
    statistics: dict[str, float]  # family -> statistic (psi: max PSI; ks/bbsd: min adjusted p; mmd: permutation p)
    thresholds: dict[str, float]
    psi: dict[str, float] = field(default_factory=dict)  # feature -> PSI
    psi_bands: dict[str, str] = field(default_factory=dict)
    ks_p_adjusted: dict[str, float] = field(default_factory=dict)  # feature -> BH-adjusted p
    bbsd_p_adjusted: dict[str, float] = field(default_factory=dict)  # class -> Bonferroni-adjusted p
    mmd2: float | None = None  # unbiased MMD² between reference and window embeddings (effect size)
    feature_shift: dict[str, float] = field(default_factory=dict)  # feature -> relative change of the median

    def moved_features(self) -> list[str]:
        """Features that moved (KS-significant at the calibrated level, or PSI in the 'major' band), biggest first."""
        alpha = self.thresholds.get("ks", 0.0)
        moved = {f for f, p in self.ks_p_adjusted.items() if p <= alpha} | {
            f for f, b in self.psi_bands.items() if b == "major"
        }
        # Ties (PSI saturates once every image lands outside the reference range) are broken by the size of the
        # median change, then by name: a set's order varies between processes, and reports must be reproducible.
        return sorted(moved, key=lambda f: (-self.psi.get(f, 0.0), -abs(self.feature_shift.get(f, 0.0)), f))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DriftDetector:
    """Runs the four test families on a window against the reference, with replay-calibrated thresholds."""

    def __init__(
        self,
        reference: Sample,
        null_pool: Sample,
        feature_names: Sequence[str],
        class_names: Sequence[str],
        *,
        alpha: float = 0.05,
        mmd_ref_size: int = 200,
        seed: int = 0,
    ) -> None:
        self.reference = reference
        self.null_pool = null_pool
        self.feature_names = list(feature_names)
        self.class_names = list(class_names)
        self.alpha = alpha
        self.seed = seed
        self.edges = [frozen_bin_edges(reference.features[:, j]) for j in range(reference.features.shape[1])]
        self.ref_fractions = [bin_fractions(reference.features[:, j], e) for j, e in enumerate(self.edges)]
        rng = np.random.default_rng(seed)
        # MMD compares against a fixed subsample of the reference: its cost grows with the square of the size.
        self.mmd_ref = reference.embeddings[
            rng.choice(len(reference), min(mmd_ref_size, len(reference)), replace=False)
        ]
        self.bandwidth = median_bandwidth(self.mmd_ref)
        self.ref_medians = np.median(reference.features, axis=0)
        self.thresholds: dict[int, dict[str, float]] = {}  # window size -> family -> threshold
        self.calibration: dict[int, dict[str, Any]] = {}

    # -- statistics --------------------------------------------------------------------------------------
    def _statistics(self, window: Sample, *, mmd_max: int = 300) -> dict[str, Any]:
        psis = [
            psi(rf, bin_fractions(window.features[:, j], e))
            for j, (e, rf) in enumerate(zip(self.edges, self.ref_fractions, strict=True))
        ]
        ks_adj = benjamini_hochberg(ks_pvalues(self.reference.features, window.features))
        bbsd_p = ks_pvalues(self.reference.probs, window.probs)
        bbsd_adj = np.minimum(bbsd_p * len(bbsd_p), 1.0)  # Bonferroni across classes
        emb = window.embeddings
        if len(emb) > mmd_max:  # a fixed-size subsample keeps MMD's cost flat for large windows
            emb = emb[np.random.default_rng(self.seed + 1).choice(len(emb), mmd_max, replace=False)]
        return {
            "psi": max(psis),
            "psi_each": psis,
            "ks": float(ks_adj.min()),
            "ks_each": ks_adj,
            "bbsd": float(bbsd_adj.min()),
            "bbsd_each": bbsd_adj,
            "mmd": mmd_permutation_pvalue(self.mmd_ref, emb, self.bandwidth, seed=self.seed),
            "mmd2": mmd2(self.mmd_ref, emb, self.bandwidth),
        }

    # -- calibration -------------------------------------------------------------------------------------
    def calibrate(self, window_size: int, n_windows: int = 300) -> dict[str, float]:
        """Thresholds for one window size, and the false-alarm rate they actually give.

        KS, BBSD and MMD produce p-values that are exact under "no drift" (KS for continuous features, MMD by
        permutation), so their threshold is the Bonferroni share of the budget, alpha/4. PSI has no distribution
        theory: its threshold is replayed, the (1 - alpha/4) quantile of max-PSI over windows drawn from one half
        of the null pool. The other half is then replayed through the complete detector to *measure* the
        false-alarm rate, reported next to the target: an honest number, not the one we tuned on.
        """
        if window_size in self.thresholds:
            return self.thresholds[window_size]
        rng = np.random.default_rng(self.seed + window_size)
        order = rng.permutation(len(self.null_pool))
        half = len(order) // 2
        calib_pool, check_pool = order[:half], order[half:]
        # Without replacement while the pool is large enough: duplicated images would make windows look more alike
        # than real ones and bias the threshold.
        replace = window_size > half // 2

        def draw(pool: np.ndarray) -> Sample:
            return self.null_pool.take(rng.choice(pool, window_size, replace=replace))

        a = self.alpha / len(FAMILIES)
        max_psi = []
        for _ in range(n_windows):
            w = draw(calib_pool)
            max_psi.append(
                max(
                    psi(rf, bin_fractions(w.features[:, j], e))
                    for j, (e, rf) in enumerate(zip(self.edges, self.ref_fractions, strict=True))
                )
            )
        thresholds = {"psi": float(np.quantile(max_psi, 1 - a)), "ks": a, "bbsd": a, "mmd": a}
        self.thresholds[window_size] = thresholds
        n_check = 100
        fired = {f: 0 for f in FAMILIES}
        alarms = 0
        for _ in range(n_check):
            any_fired, fams = self._verdict(self._statistics(draw(check_pool)), thresholds)
            alarms += any_fired
            for f, v in fams.items():
                fired[f] += v
        self.calibration[window_size] = {
            "thresholds": thresholds,
            "target_false_alarm_rate": self.alpha,
            "measured_false_alarm_rate": alarms / n_check,
            "measured_by_family": {f: v / n_check for f, v in fired.items()},
            "replayed_windows": n_windows,
            "check_windows": n_check,
            "with_replacement": replace,
        }
        return thresholds

    def set_thresholds(self, window_size: int, thresholds: dict[str, float]) -> None:
        """Install previously computed thresholds (e.g. cached in the state dir)."""
        self.thresholds[window_size] = dict(thresholds)

    @staticmethod
    def _verdict(stats: dict[str, Any], thr: dict[str, float]) -> tuple[bool, dict[str, bool]]:
        fired = {
            "psi": stats["psi"] > thr["psi"],
            "mmd": stats["mmd"] <= thr["mmd"],
            "ks": stats["ks"] <= thr["ks"],
            "bbsd": stats["bbsd"] <= thr["bbsd"],
        }
        return any(fired.values()), fired

    # -- the check ---------------------------------------------------------------------------------------
    def check(self, window: Sample) -> DriftResult:
        """All tests on one window. Thresholds are calibrated for this window size on first use."""
        thr = self.calibrate(len(window))
        stats = self._statistics(window)
        drifted, fired = self._verdict(stats, thr)
        medians = np.median(window.features, axis=0)
        shift = {
            f: float((m - r) / abs(r)) if r else float(m - r)
            for f, m, r in zip(self.feature_names, medians, self.ref_medians, strict=True)
        }
        return DriftResult(
            n=len(window),
            drifted=bool(drifted),
            families={k: bool(v) for k, v in fired.items()},
            statistics={f: float(stats[f]) for f in FAMILIES},
            thresholds=thr,
            psi=dict(zip(self.feature_names, map(float, stats["psi_each"]), strict=True)),
            psi_bands={f: psi_band(v) for f, v in zip(self.feature_names, stats["psi_each"], strict=True)},
            ks_p_adjusted=dict(zip(self.feature_names, map(float, stats["ks_each"]), strict=True)),
            bbsd_p_adjusted=dict(zip(self.class_names, map(float, stats["bbsd_each"]), strict=True)),
            mmd2=float(stats["mmd2"]),
            feature_shift=shift,
        )
