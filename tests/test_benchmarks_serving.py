"""The serving benchmark's method: the load generator gets its own CPU, and ratios are taken within a round."""

from __future__ import annotations

import os

import pytest

from benchmarks import serving


@pytest.mark.parametrize(
    ("available", "expected"),
    [({0, 1}, ({0}, {1})), ({2, 3, 5, 7}, ({2}, {3, 5, 7})), ({4}, (None, None))],
)
def test_the_load_generator_gets_the_first_cpu_and_the_measured_side_the_rest(monkeypatch, available, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(available))
    assert serving._cpu_split() == expected


def test_ratios_compare_measurements_of_the_same_round():
    row = {
        "in_process": {"batch1_p50_ms": 2.0, "batched16_rps": 800.0},
        "ours_batching_on_c1": {"p50_ms": 4.5},
        "ours_batching_on_c16": {"throughput_rps": 400.0},
        "ours_batching_off_c16": {"throughput_rps": 200.0},
        "mlflow_serve_c16": {"throughput_rps": 160.0},
    }
    scoring = {"score_folder_img_s": 900.0, "plain_loop_img_s": 750.0, "bare_forward_img_s": 1800.0}
    ratios = serving._ratios(row, scoring)
    assert ratios["ours16_over_mlflow16 (target >= 3)"] == pytest.approx(2.5)
    assert ratios["ours16_over_inprocess_batched (target >= 0.5)"] == pytest.approx(0.5)
    assert ratios["ours1_p50_minus_inprocess_batch1_ms (target <= 3)"] == pytest.approx(2.5)
    assert ratios["batching_on_over_off_at_16"] == pytest.approx(2.0)
    assert ratios["scoring_over_plain_loop (target >= 0.8)"] == pytest.approx(1.2)
    assert ratios["scoring_over_forward_pass_alone"] == pytest.approx(0.5)
