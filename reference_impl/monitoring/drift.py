"""Drift tests and their calibration. Chapter: "Monitoring in production" (data drift, alert thresholds).

Four families of test, each answering "does this window of production images look like the reference?":

- **PSI** (population stability index) per interpretable feature, on the reference's *frozen* decile bins;
- **KS** (Kolmogorov-Smirnov) per feature: the largest gap between the two cumulative distributions;
- **MMD** (maximum mean discrepancy) between the model's embeddings, a kernel two-sample statistic that sees shifts
  no single hand-picked feature captures;
- **BBSD** (black-box shift detection): KS on the model's softmax outputs, which moves when the inputs move in ways
  that matter *to the model*.

Why calibrate? Textbook cut-offs (PSI 0.1 / 0.25) ignore the window size: with 50 images PSI is noisy and 0.1
fires constantly; with 1,000 it is smooth and 0.25 misses real drift. Testing several features (and four
families) at once multiplies the chances of a false alarm. The policy gives one false-alarm budget per window (5%
by default) for "any family fires", and every threshold is set by *replaying* windows of held-out baseline images
(the null pool, saved in the bundle) against the reference.

Why replay even the tests that have exact p-values? Because the reference is *frozen*. A KS or permutation p-value
is exact when both samples are fresh: averaged over every reference we could have drawn, 5% of no-drift windows
fall below 0.05. But we drew one reference, once (800 images), and its sampling noise (say, a few more porosity
welds than the line really makes) is now a permanent offset that every window is compared against. A window of 50
is too noisy to notice it; a window of 500 measures its own distribution precisely enough to start detecting the
*reference's* quirk, so the false-alarm rate climbs with the window size: benchmarks/drift.py measured 9-10% at
windows of 200-500 with nominal p-values at alpha/4 per family, against a 5% target. Nominal p-values are exact on
average over references and anti-conservative for the one you have. Replay is *conditional* on that reference:
it compares the frozen reference with thousands of windows of other baseline images, so the reference's offset is
inside every replayed statistic. And once the null distribution comes from replay, a test needs no p-value at all:
the KS and BBSD families decide on the KS distance itself, MMD on MMD² (no permutations: fast enough to replay a
thousand windows in about a second). The BH-adjusted KS p-values, the MMD permutation p-value and the PSI bands
are still reported because people know how to read them, but the verdict uses the calibrated thresholds.

Joint calibration. Splitting alpha four ways (Bonferroni) assumes the families' false alarms never overlap, and
they do: PSI and KS look at the same features. Instead each family's threshold is its own tail quantile over the
replayed windows, at one common tail level chosen as large as possible while "any family fires" stays within the
budget on those same windows: the overlap is measured, not assumed. How windows are replayed matters as much:
drawn *without* replacement from a finite pool, windows share most of their images and vary far too little (an
earlier attempt measured 37% false alarms); drawn with replacement straight from the pool they treat the pool as
the truth, though the pool is a sample with an offset of its own (11-19% at windows of 200-500). So each replayed
window is drawn from its own bootstrap resample of the pool, which carries the pool's uncertainty into the
thresholds. The budget is an upper confidence bound, not an average: 1,000 replayed windows are allowed 38 alarms
(3.8%), so that the rate on windows like the replayed ones is <= 5% with 95% confidence, rather than an estimate
of 5% that the truth exceeds half the time. Finally the other half of the null pool, never used for the
thresholds, measures the false-alarm rate honestly.
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


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sample KS distance and p-value per column of ``(n, d)`` arrays (scipy's exact/asymptotic choice)."""
    from scipy.stats import ks_2samp

    result = ks_2samp(reference, current, axis=0)  # all columns in one call
    distance, p_value = np.asarray(result.statistic, dtype=float), np.asarray(result.pvalue, dtype=float)
    return np.atleast_1d(distance), np.atleast_1d(p_value)


def ks_pvalues(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Two-sample KS p-value per column of ``(n, d)`` arrays."""
    return ks_test(reference, current)[1]


def ks_distance_counts(reference: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """KS distance between ``reference`` and each of many windows drawn from a pool, without building the windows.

    ``values``: one feature of the pool, ``(N,)``; ``counts``: ``(w, N)``, how many times each pool item is in each
    window. A window's ECDF is then a cumulative sum of its counts over the pool in sorted order, so hundreds of
    windows cost one matrix operation instead of hundreds of ``ks_2samp`` calls. Same distance as scipy's: the
    largest gap between the ECDFs is reached either at a pool value or just before one (where the window's ECDF is
    still at the previous step and the reference's has risen as far as it will).
    """
    ref = np.sort(reference)
    order = np.argsort(values, kind="stable")
    v = values[order]
    last = np.r_[v[1:] != v[:-1], True]  # the last of each run of equal values: ties step together
    n = counts.sum(axis=1, keepdims=True)
    window_at = np.cumsum(counts[:, order], axis=1)[:, last] / n  # window ECDF at each distinct pool value
    window_before = np.concatenate([np.zeros((len(counts), 1)), window_at[:, :-1]], axis=1)
    ref_at = np.searchsorted(ref, v[last], side="right") / len(ref)
    ref_before = np.searchsorted(ref, v[last], side="left") / len(ref)
    return np.maximum(np.abs(ref_at - window_at).max(axis=1), np.abs(ref_before - window_before).max(axis=1))


# ----------------------------------------------------------------------------------------------------- MMD
def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def median_bandwidth(x: np.ndarray) -> float:
    """The median heuristic: kernel width = median pairwise distance of the pooled sample."""
    d = _sq_dists(x, x)
    med = np.median(d[np.triu_indices_from(d, k=1)])
    return float(np.sqrt(med)) if med > 0 else 1.0


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float, y_ids: np.ndarray | None = None) -> float:
    """Unbiased estimate of squared MMD with a Gaussian kernel.

    ``y_ids``: where each row of ``y`` came from, for a window drawn *with replacement*. A pair of copies of one image
    is not a pair of independent images (its kernel value is 1), so such pairs are left out like the diagonal;
    counting them would inflate MMD² on replayed windows and make the calibrated threshold too lenient.
    """
    gamma = 1.0 / (2 * bandwidth**2)
    kxx, kyy, kxy = np.exp(-gamma * _sq_dists(x, x)), np.exp(-gamma * _sq_dists(y, y)), np.exp(-gamma * _sq_dists(x, y))
    m, n = len(x), len(y)
    if y_ids is None:
        yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    else:
        distinct = np.asarray(y_ids)[:, None] != np.asarray(y_ids)[None, :]
        yy = kyy[distinct].sum() / max(int(distinct.sum()), 1)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + yy - 2 * kxy.mean())


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


# ------------------------------------------------------------------------------------------ calibration
def replay_budget(n: int, alpha: float, confidence: float = 0.95) -> int:
    """How many of ``n`` replayed no-drift windows may fire while the false-alarm rate is still held at ``alpha``.

    Not ``alpha * n``: that would make alpha the *expected* rate, exceeded about half the time by the estimate's
    own noise. This is the largest count whose one-sided Clopper-Pearson upper bound (at ``confidence``) is at
    most alpha, e.g. 38 of 1,000 windows for alpha = 5%. Zero if no count qualifies (too few windows).
    """
    from scipy.stats import beta

    fired = np.arange(n)
    ok = fired[beta.ppf(confidence, fired + 1, n - fired) <= alpha]
    return int(ok.max()) if len(ok) else 0


def joint_thresholds(replayed: dict[str, np.ndarray], budget: int) -> tuple[dict[str, float], int]:
    """Per-family thresholds with one common tail level, so that at most ``budget`` windows fire *any* family.

    ``replayed``: family -> its statistic (larger = more drift) on each of n no-drift windows. At tail level k a
    family's threshold is its (k+1)-th largest replayed value and a window fires the family when it is strictly
    above, so at most k of the n windows fire each family (fewer with ties). The families overlap (PSI and KS look
    at the same features), so the any-fire count is measured, not bounded by a sum: take the largest k whose
    any-fire count is within the budget. Returns (thresholds, k); k / n is the tail level of every family.
    """
    families = list(replayed)
    n = len(replayed[families[0]])
    values = {f: np.asarray(replayed[f], dtype=float) for f in families}
    # at_least[f][w]: how many windows have a statistic >= window w's. Window w fires family f at level k exactly
    # when at_least[f][w] <= k, and fires *any* family when its smallest count over the families is <= k.
    at_least = {f: n - np.searchsorted(np.sort(v), v, side="left") for f, v in values.items()}
    smallest = np.sort(np.min(np.stack([at_least[f] for f in families]), axis=0))
    k = n if budget >= n else int(smallest[budget]) - 1  # k = 0 always qualifies: nothing exceeds the maximum
    thresholds = {f: float(np.sort(v)[::-1][k]) if k < n else -np.inf for f, v in values.items()}
    return thresholds, k


def _ks_asymptotic_p(distance: float, n1: int, n2: int) -> float:
    """Kolmogorov's large-sample p-value of a two-sample KS distance (for reading a threshold, not for testing)."""
    from scipy.special import kolmogorov

    return float(kolmogorov(distance * np.sqrt(n1 * n2 / (n1 + n2))))


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
    statistics: dict[str, float]  # family -> decision statistic (psi: max PSI; ks/bbsd: max KS distance; mmd: MMD²)
    thresholds: dict[str, float]  # family -> calibrated threshold for this window size (see ``fires``)
    psi: dict[str, float] = field(default_factory=dict)  # feature -> PSI
    psi_bands: dict[str, str] = field(default_factory=dict)
    ks_distance: dict[str, float] = field(default_factory=dict)  # feature -> KS distance (what the verdict uses)
    ks_p_adjusted: dict[str, float] = field(default_factory=dict)  # feature -> BH-adjusted p (nominal, for reading)
    bbsd_p_adjusted: dict[str, float] = field(default_factory=dict)  # class -> Bonferroni-adjusted p
    mmd2: float | None = None  # unbiased MMD² between reference and window embeddings (effect size)
    mmd_p_value: float | None = None  # MMD's permutation p-value: reported, not the verdict (see the module notes)
    feature_shift: dict[str, float] = field(default_factory=dict)  # feature -> relative change of the median

    def moved_features(self) -> list[str]:
        """Features that moved (KS distance beyond the calibrated threshold, or PSI in the 'major' band), biggest
        first. The KS family fires exactly when at least one feature is beyond its threshold."""
        level = self.thresholds.get("ks", np.inf)
        moved = {f for f, d in self.ks_distance.items() if d > level} | {
            f for f, b in self.psi_bands.items() if b == "major"
        }
        # Ties (PSI saturates once every image lands outside the reference range) are broken by the size of the
        # median change, then by name: a set's order varies between processes, and reports must be reproducible.
        return sorted(moved, key=lambda f: (-self.psi.get(f, 0.0), -abs(self.feature_shift.get(f, 0.0)), f))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DriftDetector:
    """Runs the four test families on a window against the reference, with replay-calibrated thresholds."""

    MMD_MAX = 300  # MMD looks at a fixed-size subsample of larger windows: its cost grows with the square of the size

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
    def _statistics(self, window: Sample) -> dict[str, Any]:
        psis = [
            psi(rf, bin_fractions(window.features[:, j], e))
            for j, (e, rf) in enumerate(zip(self.edges, self.ref_fractions, strict=True))
        ]
        ks_d, ks_p = ks_test(self.reference.features, window.features)
        bbsd_d, bbsd_p = ks_test(self.reference.probs, window.probs)
        emb = window.embeddings
        if len(emb) > self.MMD_MAX:  # a random subsample of the window is still a random sample of production
            emb = emb[np.random.default_rng(self.seed + 1).choice(len(emb), self.MMD_MAX, replace=False)]
        return {
            "psi": max(psis),
            "psi_each": psis,
            "ks": float(ks_d.max()),
            "ks_each": ks_d,
            "ks_p_adjusted": benjamini_hochberg(ks_p),
            "bbsd": float(bbsd_d.max()),
            "bbsd_p_adjusted": np.minimum(bbsd_p * len(bbsd_p), 1.0),  # Bonferroni across classes
            "mmd": mmd2(self.mmd_ref, emb, self.bandwidth),
            "mmd_p": mmd_permutation_pvalue(self.mmd_ref, emb, self.bandwidth, seed=self.seed),
        }

    def _replay(self, pool: np.ndarray, draws: np.ndarray) -> dict[str, np.ndarray]:
        """The decision statistics ``check`` computes, for many windows at once.

        ``pool``: rows of the null pool, ``(N,)``; ``draws``: ``(n_windows, window_size)`` positions in ``pool``.
        Every statistic is computed from how often each pool image appears in each window (a count matrix), so
        the cost hardly depends on the window size and a thousand windows take well under a second.
        """
        sample = self.null_pool.take(pool)
        n_windows, size = draws.shape

        def counts_of(d: np.ndarray) -> np.ndarray:
            rows = np.repeat(np.arange(len(d)), d.shape[1])
            return np.bincount(rows * len(pool) + d.ravel(), minlength=len(d) * len(pool)).reshape(len(d), -1)

        counts = counts_of(draws).astype(float)
        psi_max = np.zeros(n_windows)
        for j, (e, rf) in enumerate(zip(self.edges, self.ref_fractions, strict=True)):
            bins = np.clip(np.searchsorted(e, sample.features[:, j], side="right") - 1, 0, len(e) - 2)
            c = np.maximum(counts @ np.eye(len(e) - 1)[bins] / size, PSI_EPS)
            r = np.maximum(rf, PSI_EPS)
            psi_max = np.maximum(psi_max, ((c - r) * np.log(c / r)).sum(axis=1))

        def ks_max(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
            return np.max(
                [ks_distance_counts(reference[:, j], values[:, j], counts) for j in range(values.shape[1])], 0
            )

        # MMD on the window's first MMD_MAX draws (iid draws: any of them are a random subsample), with pairs of
        # copies of one image left out, as in mmd2(..., y_ids=...): k(y, y) = 1 is not an independent pair.
        c = counts_of(draws[:, : self.MMD_MAX]).astype(float)
        m = int(c[0].sum())
        gamma = 1.0 / (2 * self.bandwidth**2)
        k_pool = np.exp(-gamma * _sq_dists(sample.embeddings, sample.embeddings))
        k_ref = np.exp(-gamma * _sq_dists(sample.embeddings, self.mmd_ref)).sum(axis=1)
        k_xx = np.exp(-gamma * _sq_dists(self.mmd_ref, self.mmd_ref))
        r = len(self.mmd_ref)
        copies = (c * c).sum(axis=1)  # ordered pairs of one image with itself or a copy (kernel value 1)
        yy = (np.einsum("wi,wi->w", c @ k_pool, c) - copies) / np.maximum(m * m - copies, 1)
        mmd = (k_xx.sum() - np.trace(k_xx)) / (r * (r - 1)) + yy - 2 * (c @ k_ref) / (m * r)
        return {
            "psi": psi_max,
            "ks": ks_max(self.reference.features, sample.features),
            "bbsd": ks_max(self.reference.probs, sample.probs),
            "mmd": mmd,
        }

    # -- calibration -------------------------------------------------------------------------------------
    def calibrate(self, window_size: int, n_windows: int = 1000, n_check: int = 500) -> dict[str, float]:
        """Thresholds for one window size, and the false-alarm rate they actually give.

        Half of the null pool is replayed against the frozen reference (see the module notes for why even tests
        with exact p-values need this); ``joint_thresholds`` picks one tail level for all four families so that
        "any family fires" stays within ``replay_budget`` on the replayed windows; the other half of the pool
        (``n_check`` windows) then *measures* the false-alarm rate: an honest number, reported next to the target,
        not the one we tuned on. Small budgets need more windows to resolve their tail: at least 50 / alpha are
        replayed (at most 5,000). About a second per window size on 2 cores, once: the result is cached.
        """
        if window_size in self.thresholds:
            return self.thresholds[window_size]
        rng = np.random.default_rng(self.seed + window_size)
        order = rng.permutation(len(self.null_pool))
        half = len(order) // 2
        calib_pool, check_pool = order[:half], order[half:]
        n_windows = min(max(n_windows, int(np.ceil(50 / self.alpha))), 5000)
        # Each replayed window is drawn with replacement from its own resample of the calibration half (a
        # bootstrap of the pool, then a window from it). Windows drawn straight from the pool would treat its
        # images as the whole truth, but the pool is a sample too: its own offset from the line's distribution is
        # as large as a window's noise once windows reach a few hundred images (plain draws measured 11-19%
        # false alarms on fresh windows of 200-500). The resample puts that uncertainty into the replay, so the
        # thresholds hold for fresh windows, not just for windows of this pool. With replacement, not without:
        # 500 images drawn from 800 share most of their images and vary far too little (37% false alarms).
        resample = rng.integers(0, half, (n_windows, half))
        draws = np.take_along_axis(resample, rng.integers(0, half, (n_windows, window_size)), axis=1)
        replayed = self._replay(calib_pool, draws)
        budget = replay_budget(n_windows, self.alpha)
        thresholds, k = joint_thresholds(replayed, budget)
        self.thresholds[window_size] = thresholds

        def fired_share(stats: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
            hit = {f: stats[f] > thresholds[f] for f in FAMILIES}
            any_hit = np.any(np.stack(list(hit.values())), axis=0)
            return float(any_hit.mean()), {f: float(h.mean()) for f, h in hit.items()}

        replay_rate, replay_by_family = fired_share(replayed)
        # The check half plays "fresh windows from the line": plain draws with replacement.
        checked = self._replay(check_pool, rng.integers(0, len(check_pool), (n_check, window_size)))
        measured, by_family = fired_share(checked)
        self.calibration[window_size] = {
            "thresholds": thresholds,
            "method": "joint replay",
            "tail_level": k / n_windows,  # each family fires on at most this share of the replayed windows
            # What a textbook KS test would need as per-column p-value to fire where the calibrated distance does
            # (asymptotic formula): compare with the nominal alpha/4 to see how far the frozen reference moved it.
            "nominal_ks_p_at_threshold": {
                f: _ks_asymptotic_p(thresholds[f], len(ref), window_size)
                for f, ref in (("ks", self.reference.features), ("bbsd", self.reference.probs))
            },
            "target_false_alarm_rate": self.alpha,
            "replayed_false_alarm_rate": replay_rate,  # any family, on the windows the thresholds were set on
            "replayed_by_family": replay_by_family,
            "measured_false_alarm_rate": measured,  # any family, on the held-out half: the number to trust
            "measured_by_family": by_family,
            "replayed_windows": n_windows,
            "check_windows": n_check,
            "with_replacement": True,
        }
        return thresholds

    def set_thresholds(self, window_size: int, thresholds: dict[str, float]) -> None:
        """Install previously computed thresholds (e.g. cached in the state dir)."""
        self.thresholds[window_size] = dict(thresholds)

    @staticmethod
    def _verdict(stats: dict[str, Any], thr: dict[str, float]) -> tuple[bool, dict[str, bool]]:
        fired = {f: bool(stats[f] > thr[f]) for f in FAMILIES}
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
            ks_distance=dict(zip(self.feature_names, map(float, stats["ks_each"]), strict=True)),
            ks_p_adjusted=dict(zip(self.feature_names, map(float, stats["ks_p_adjusted"]), strict=True)),
            bbsd_p_adjusted=dict(zip(self.class_names, map(float, stats["bbsd_p_adjusted"]), strict=True)),
            mmd2=float(stats["mmd"]),
            mmd_p_value=stats["mmd_p"],
            feature_shift=shift,
        )
