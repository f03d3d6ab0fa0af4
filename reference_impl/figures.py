"""The pictures a practitioner looks at, one function per chart. Chapter: every section (the labs draw them inline).

Each function takes plain numbers or images and returns a :class:`matplotlib.figure.Figure`. They are built with
matplotlib's object-oriented API, not ``pyplot``: no global figure state and no backend switch, so the same function
draws inline in a notebook (after ``%matplotlib inline``), into a PNG for the demo's report (``save``), and on a
headless server, and a lab that draws twenty figures does not keep twenty open.

The module depends on numpy, matplotlib and the load test's nearest-rank ``percentile``: stages pass it their
numbers; it imports no stage that would import it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import cycle, pairwise
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .loadtest import percentile

# One colour per role, the same in every chart: the model in production, the candidate, the threshold it must meet.
CHAMPION_COLOR = "tab:blue"
CHALLENGER_COLOR = "tab:orange"
LIMIT_COLOR = "tab:red"


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (or any format matplotlib infers from the suffix) and return the path."""
    fig.savefig(path, dpi=dpi)
    return Path(path)


def image_grid(
    images: np.ndarray, labels: Sequence[int], classes: Sequence[str], per_class: int = 4, title: str | None = None
) -> Figure:
    """``per_class`` radiographs of every class, one row per class (Packaging a model: what the model sees)."""
    labels = np.asarray(labels)
    fig = Figure(figsize=(1.3 * per_class + 1.2, 1.3 * len(classes)), layout="constrained")
    axes = fig.subplots(len(classes), per_class, squeeze=False)
    for row, name in enumerate(classes):
        picks = np.flatnonzero(labels == row)[:per_class]
        for col in range(per_class):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(picks):
                ax.imshow(images[picks[col]], cmap="gray", vmin=0, vmax=255)
            else:
                ax.set_axis_off()
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def side_by_side(
    before: np.ndarray, after: np.ndarray, n: int = 4, titles: tuple[str, str] = ("before", "after")
) -> Figure:
    """The same number of radiographs from two conditions, a row each (Monitoring: what a new camera does)."""
    n = min(n, len(before), len(after))
    fig = Figure(figsize=(1.5 * n + 1.0, 3.4), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for row, (stack, name) in enumerate(((before, titles[0]), (after, titles[1]))):
        for col in range(n):
            ax = axes[row, col]
            ax.imshow(stack[col], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name, fontsize=9)
    return fig


def confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> Figure:
    """Counts of true class (rows) against predicted class (columns): which defect is taken for which."""
    cm = np.asarray(matrix)
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return fig


def latency_histogram(latencies_ms: Sequence[float], slo_ms: float | None = None, title: str = "") -> Figure:
    """The distribution of response times with p50 / p99 marked (Serving: why percentiles, not the mean)."""
    values = np.asarray(latencies_ms, dtype=float)
    fig = Figure(figsize=(6.4, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.hist(values, bins=40, color="tab:gray")
    # Nearest-rank percentiles (the load test's definition): each marked line is a latency actually observed.
    for q, style in ((50, "-"), (99, "--")):
        v = float(percentile(values, q))
        ax.axvline(v, color="black", ls=style, lw=1)
        ax.text(v, ax.get_ylim()[1] * 0.95, f" p{q} {v:.1f} ms", fontsize=8, va="top")
    ax.axvline(float(values.mean()), color=CHAMPION_COLOR, ls=":", lw=1, label=f"mean {values.mean():.1f} ms")
    if slo_ms is not None and slo_ms <= values.max() * 1.5:
        ax.axvline(slo_ms, color=LIMIT_COLOR, lw=1.5, label=f"p99 SLO {slo_ms:g} ms")
    elif slo_ms is not None:  # drawn to scale it would squash the histogram into one bar: say where it is instead
        ax.text(
            0.99,
            0.6,
            f"p99 SLO {slo_ms:g} ms:\nfar to the right,\noff this chart",
            transform=ax.transAxes,
            ha="right",
            fontsize=8,
            color=LIMIT_COLOR,
        )
    ax.set_xlabel("response time (ms)")
    ax.set_ylabel("requests")
    ax.legend(fontsize=8, loc="center right")
    ax.set_title(title, fontsize=10)
    return fig


def load_curves(rows: Sequence[Mapping[str, float | str]], title: str = "") -> Figure:
    """Throughput and p99 latency against concurrency, one line per server setting (Serving: micro-batching).

    ``rows``: dicts with ``setting`` (the line's name), ``concurrency``, ``throughput`` (req/s) and ``p99`` (ms).
    """
    fig = Figure(figsize=(8.0, 3.0), layout="constrained")
    ax_t, ax_p = fig.subplots(1, 2)
    for setting in dict.fromkeys(str(r["setting"]) for r in rows):
        mine = sorted((r for r in rows if r["setting"] == setting), key=lambda r: float(r["concurrency"]))
        x = [float(r["concurrency"]) for r in mine]
        ax_t.plot(x, [float(r["throughput"]) for r in mine], "o-", label=setting)
        ax_p.plot(x, [float(r["p99"]) for r in mine], "o-", label=setting)
    ax_t.set_ylabel("throughput (requests/s)")
    ax_p.set_ylabel("p99 latency (ms)")
    for ax in (ax_t, ax_p):
        ax.set_xlabel("concurrent clients")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def bin_comparison(
    edges: Sequence[float], reference_fractions: Sequence[float], current_fractions: Sequence[float],
    feature: str, psi_value: float | None = None,
) -> Figure:  # fmt: skip
    """Share of images per frozen reference bin, reference vs current (Monitoring: what PSI adds up).

    The bins are the reference's deciles, so the reference bars are all about 0.1; a shifted feature piles the
    current window into a few bins.
    """
    ref = np.asarray(reference_fractions, dtype=float)
    cur = np.asarray(current_fractions, dtype=float)
    fig = Figure(figsize=(6.4, 3.0), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(ref))
    ax.bar(x - 0.2, ref, width=0.4, color=CHAMPION_COLOR, label="reference (training time)")
    ax.bar(x + 0.2, cur, width=0.4, color=CHALLENGER_COLOR, label="this window")
    inner = np.asarray(edges, dtype=float)[1:-1]
    names = [f"< {inner[0]:.3g}", *(f"{a:.3g}-{b:.3g}" for a, b in pairwise(inner)), f">= {inner[-1]:.3g}"]
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel(f"{feature} (frozen reference bins)")
    ax.set_ylabel("share of images")
    ax.legend(fontsize=8)
    ax.set_title(f"{feature}" + ("" if psi_value is None else f": PSI {psi_value:.2f}"), fontsize=10)
    return fig


def timeline(
    windows: Sequence[int],
    accuracy: Mapping[str, Sequence[float | None]],
    psi_max: Sequence[float] | None = None,
    drifted: Sequence[bool] | None = None,
    *,
    psi_band: float = 0.25,
    phases: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """Accuracy series and the largest PSI per monitoring window, drifted windows in red (Monitoring, Retraining).

    ``accuracy``: name -> one value per window (``None`` where unknown, e.g. no labels yet). ``psi_max`` (optional:
    without it only the accuracy panel is drawn) and ``drifted``: one value per window. ``phases``: one label per
    window; a dashed line marks each change (e.g. baseline -> drift -> shadow).
    """
    fig = Figure(figsize=(9.0, 5.0 if psi_max is not None else 3.2), layout="constrained")
    if psi_max is not None:
        ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        axes = (ax1, ax2)
    else:
        ax1 = fig.subplots()
        axes = (ax1,)
        ax1.set_xlabel("window")
    for (name, values), style in zip(accuracy.items(), cycle(["o-", "s--", "^:", "d-."])):
        ax1.plot(windows, [np.nan if v is None else v for v in values], style, label=name)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("accuracy")
    ax1.legend(loc="lower left", fontsize=8)
    if psi_max is not None:
        flags = drifted if drifted is not None else [False] * len(psi_max)
        # Log scale: a healthy window's PSI is ~0.1, a new camera's ~8; both must be readable on one axis.
        ax2.bar(windows, [max(p or 0.0, 1e-3) for p in psi_max],
                color=[LIMIT_COLOR if d else "tab:gray" for d in flags])  # fmt: skip
        ax2.axhline(psi_band, color=LIMIT_COLOR, lw=0.8, ls=":")
        ax2.text(
            windows[0] - 0.4 if len(windows) else 0,
            psi_band * 1.08,
            f"PSI {psi_band:g} (conventional alert band)",
            fontsize=7,
            color=LIMIT_COLOR,
            va="bottom",
        )
        ax2.set_yscale("log")
        ax2.set_ylim(1e-2, 50)
        ax2.set_ylabel("max PSI vs reference\n(red: drift detected)")
        ax2.set_xlabel("monitoring window")
    if phases:
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                for ax in axes:
                    ax.axvline(windows[i] - 0.5, color="tab:orange", lw=0.8, ls="--")
                ax1.text(windows[i] - 0.45, 1.0, phases[i], fontsize=8, color="tab:orange", va="top")
        ax1.text(windows[0] - 0.3, 1.0, phases[0], fontsize=8, color="tab:orange", va="top")
    ax1.set_title(title, fontsize=10)
    return fig


def recall_comparison(
    champion: Mapping[str, float], challenger: Mapping[str, float], max_drop: float, title: str = ""
) -> Figure:
    """Per-class recall of champion and challenger, with the lowest recall the gate allows (Retraining: the gate).

    The red tick on each class is the champion's recall minus ``max_drop``: a challenger bar below it fails.
    """
    classes = list(champion)
    x = np.arange(len(classes))
    ch = np.array([champion[c] for c in classes])
    cl = np.array([challenger.get(c, np.nan) for c in classes])
    fig = Figure(figsize=(8.0, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(x - 0.2, ch, width=0.4, color=CHAMPION_COLOR, label="champion")
    ax.bar(x + 0.2, cl, width=0.4, color=CHALLENGER_COLOR, label="challenger")
    ax.hlines(ch - max_drop, x - 0.4, x + 0.4, color=LIMIT_COLOR, lw=2, label=f"champion - {max_drop:g} (gate)")
    for i in np.flatnonzero(cl < ch - max_drop - 1e-9):
        ax.text(x[i] + 0.2, cl[i] - 0.005, "FAIL", color="white", ha="center", va="top", fontsize=8, fontweight="bold")
    low = float(np.nanmin(np.concatenate([ch - max_drop, cl])))
    ax.set_ylim(max(0.0, low - 0.1), 1.02)  # zoomed: the differences the gate judges are a few points
    ax.set_xticks(x, classes)
    ax.set_ylabel("recall")
    fig.legend(fontsize=8, loc="outside right upper")
    ax.set_title(title, fontsize=10)
    return fig
