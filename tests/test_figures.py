"""The labs' pictures (reference_impl/figures.py): each chart shows what its docstring promises, headless."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from reference_impl import data, figures

CLASSES = data.CLASSES


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


def test_image_grid_has_a_row_per_class_showing_only_that_class() -> None:
    d = data.generate(40, seed=3)
    fig = figures.image_grid(d.images, d.labels, CLASSES, per_class=3)
    assert len(fig.axes) == len(CLASSES) * 3
    assert [fig.axes[r * 3].get_ylabel() for r in range(len(CLASSES))] == list(CLASSES)
    first_crack = d.images[np.flatnonzero(d.labels == CLASSES.index("crack"))[0]]
    shown = fig.axes[CLASSES.index("crack") * 3].images[0].get_array()
    assert np.array_equal(np.asarray(shown), first_crack), "row 'crack' starts with the first crack image"


def test_image_grid_leaves_a_gap_when_a_class_has_too_few_images() -> None:
    d = data.generate(8, seed=4)
    fig = figures.image_grid(d.images, d.labels, CLASSES, per_class=6)
    shown = sum(len(ax.images) for ax in fig.axes)
    assert shown == min(8, sum(min(int((d.labels == k).sum()), 6) for k in range(len(CLASSES))))


def test_confusion_matrix_writes_every_count_and_saves_a_png(tmp_path: Path) -> None:
    cm = [[5, 1, 0, 0], [0, 7, 2, 0], [0, 0, 9, 0], [1, 0, 0, 4]]
    fig = figures.confusion_matrix(cm, CLASSES, title="t")
    assert sorted(int(t) for t in _texts(fig)) == sorted(v for row in cm for v in row)
    png = figures.save(fig, tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_histogram_marks_observed_percentiles_and_says_where_a_far_slo_is() -> None:
    latencies = list(range(1, 101))  # nearest rank: p50 = 50, p99 = 99
    texts = " ".join(_texts(figures.latency_histogram(latencies, slo_ms=1000)))
    assert "p50 50.0 ms" in texts and "p99 99.0 ms" in texts
    assert "1000 ms" in texts and "off this chart" in texts
    near = figures.latency_histogram(latencies, slo_ms=120)
    assert any("SLO 120 ms" in t.get_text() for t in near.axes[0].get_legend().get_texts())


def test_load_curves_draw_one_line_per_setting_in_concurrency_order() -> None:
    rows = [
        {"setting": "off", "concurrency": 8, "throughput": 130.0, "p99": 90.0},
        {"setting": "off", "concurrency": 1, "throughput": 120.0, "p99": 10.0},
        {"setting": "on", "concurrency": 1, "throughput": 150.0, "p99": 9.0},
        {"setting": "on", "concurrency": 8, "throughput": 240.0, "p99": 45.0},
    ]
    throughput_ax, p99_ax = figures.load_curves(rows).axes
    lines = {line.get_label(): line for line in throughput_ax.lines}
    assert set(lines) == {"off", "on"}
    assert list(lines["off"].get_xdata()) == [1.0, 8.0] and list(lines["off"].get_ydata()) == [120.0, 130.0]
    assert [list(line.get_ydata()) for line in p99_ax.lines] == [[10.0, 90.0], [9.0, 45.0]]


def test_bin_comparison_labels_the_open_ended_bins_and_shows_psi() -> None:
    edges = np.array([-np.inf, 0.1, 0.2, np.inf])
    fig = figures.bin_comparison(edges, [0.3, 0.4, 0.3], [0.0, 0.1, 0.9], "noise", psi_value=1.234)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["< 0.1", "0.1-0.2", ">= 0.2"]
    heights = [p.get_height() for p in ax.patches]
    assert heights == [0.3, 0.4, 0.3, 0.0, 0.1, 0.9]
    assert "PSI 1.23" in ax.get_title()


def test_timeline_marks_drifted_windows_and_phase_changes() -> None:
    fig = figures.timeline([1, 2, 3, 4], {"estimated": [0.98, 0.97, None, 0.7]}, [0.05, 0.08, 6.0, 7.0],
                           [False, False, True, True], phases=["baseline", "baseline", "drift", "drift"])  # fmt: skip
    acc_ax, psi_ax = fig.axes
    assert np.isnan(acc_ax.lines[0].get_ydata()[2]), "an unknown accuracy is a gap, not a zero"
    red = [p for p in psi_ax.patches if p.get_facecolor() == to_rgba(figures.LIMIT_COLOR)]
    assert len(red) == 2, "the two drifted windows are red"
    assert [t.get_text() for t in acc_ax.texts] == ["drift", "baseline"]
    assert len(figures.timeline([1, 2], {"true": [0.9, 0.8]}).axes) == 1, "without PSI: only the accuracy panel"


def test_recall_comparison_flags_exactly_the_classes_below_the_gate() -> None:
    champion = {"good": 0.99, "porosity": 0.97, "crack": 0.95, "lack_of_fusion": 0.98}
    challenger = {"good": 0.99, "porosity": 0.94, "crack": 0.93, "lack_of_fusion": 0.985}
    fig = figures.recall_comparison(champion, challenger, max_drop=0.02)
    ax = fig.axes[0]
    flagged = [ax.get_xticklabels()[round(t.get_position()[0])].get_text() for t in ax.texts if t.get_text() == "FAIL"]
    assert flagged == ["porosity"], "crack dropped exactly 0.02 (passes); porosity 0.03 (fails)"
    assert np.allclose(ax.collections[0].get_segments()[1][:, 1], 0.95), "porosity's limit is 0.97 - 0.02"
