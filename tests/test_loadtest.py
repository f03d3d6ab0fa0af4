"""loadtest.py: nearest-rank percentiles, request builders, and a closed-loop run against a real server."""

from __future__ import annotations

import base64
import json
import math
import random

import numpy as np
import pytest

from reference_impl.loadtest import LoadResult, build_request, percentile, run_load


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        (list(range(1, 101)), 50, 50),
        (list(range(1, 101)), 95, 95),
        (list(range(1, 101)), 99, 99),
        (list(range(1, 101)), 100, 100),
        (list(range(1, 101)), 7, 7),  # 7 / 100 * 100 == 7.000000000000001 in floating point
        (list(range(1, 101)), 14, 14),
        (list(range(1, 101)), 0.5, 1),
        (list(range(1, 51)), 14, 7),
        (list(range(1, 26)), 28, 7),
        (list(range(1, 1001)), 99.9, 999),
        ([5.0], 1, 5.0),
        ([5.0], 50, 5.0),
        ([5.0], 100, 5.0),
        ([1, 2, 3, 4], 50, 2),  # nearest rank returns an observed value, never an interpolated 2.5
        ([1, 2, 3, 4], 51, 3),
        ([1, 2, 3, 4], 25, 1),
        ([30.0, 10.0, 20.0, 50.0, 40.0], 50, 30.0),  # unsorted input
        ([30.0, 10.0, 20.0, 50.0, 40.0], 90, 50.0),
        ([30.0, 10.0, 20.0, 50.0, 40.0], 20, 10.0),
        ([2, 2, 2, 9], 75, 2),
    ],
)
def test_percentile_known_answers(values, q, expected):
    assert percentile(values, q) == expected


def test_percentile_matches_the_definition_for_many_sizes():
    rng = random.Random(0)
    for n in range(1, 120):
        values = [rng.random() for _ in range(n)]
        ordered = sorted(values)
        for q in range(1, 101):
            rank = -(-q * n // 100)  # exact integer ceiling of q% of n
            assert percentile(values, q) == ordered[rank - 1], (n, q)


def test_percentile_accepts_numpy_arrays_and_leaves_input_alone():
    timings = np.array([3.0, 1.0, 2.0])
    assert percentile(timings, 50) == 2.0
    assert list(timings) == [3.0, 1.0, 2.0]


@pytest.mark.parametrize("q", [0, -5, 100.01, 150])
def test_percentile_rejects_q_out_of_range(q):
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1, 2, 3], q)


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="empty"):
        percentile(np.array([]), 50)


def test_load_result_summary():
    result = LoadResult(
        "v1", 2, requests=5, errors=1, seconds=2.0, latencies_ms=[4.0, 1.0, 3.0, 2.0], statuses={"200": 4, "503": 1}
    )
    assert result.throughput == 2.0  # successful requests per second
    summary = result.summary()
    assert summary["p50_ms"] == 2.0 and summary["p95_ms"] == 4.0 and summary["p99_ms"] == 4.0
    assert summary["requests"] == 5 and summary["errors"] == 1 and summary["statuses"] == {"200": 4, "503": 1}
    assert "latencies_ms" not in summary
    empty = LoadResult("v1", 1, 0, 0, 0.0)
    assert empty.throughput == 0.0 and math.isnan(empty.p(50))


def test_build_request_kinds(weld_pngs):
    png = weld_pngs[0]
    path, headers, body = build_request("v1", png)
    assert (path, headers, body) == ("/v1/predict", {"content-type": "image/png"}, png)
    path, headers, body = build_request("v2", png, model_name="my-model")
    assert path == "/v2/models/my-model/infer" and headers["content-type"] == "application/json"
    (tensor,) = json.loads(body)["inputs"]
    assert tensor["datatype"] == "BYTES" and tensor["shape"] == [1]
    assert base64.b64decode(tensor["data"][0]) == png
    path, headers, body = build_request("mlflow", png)
    assert path == "/invocations" and headers["content-type"] == "application/json"
    split = json.loads(body)["dataframe_split"]
    assert split["columns"] == ["image"] and base64.b64decode(split["data"][0][0]) == png
    with pytest.raises(ValueError, match="unknown request kind"):
        build_request("grpc", png)


def test_run_load_validates_its_arguments(weld_pngs):
    url = "http://127.0.0.1:9"  # never contacted: every call below fails before sending anything
    with pytest.raises(ValueError, match="concurrency"):
        run_load(url, weld_pngs, concurrency=0)
    with pytest.raises(ValueError, match="payload"):
        run_load(url, [], n_requests=1)
    with pytest.raises(ValueError, match="stop by itself"):
        run_load(url, weld_pngs, n_requests=None, duration_s=None)


def test_run_load_against_a_live_server(live_server, weld_pngs):
    url, _ = live_server
    result = run_load(url, weld_pngs, kind="v1", concurrency=4, n_requests=40)
    assert (result.requests, result.errors, len(result.latencies_ms)) == (40, 0, 40)
    assert result.statuses == {"200": 40} and result.concurrency == 4
    assert all(ms > 0 for ms in result.latencies_ms)
    assert result.throughput > 0 and 0 < result.p(50) <= result.p(95) <= result.p(99) <= max(result.latencies_ms)
    # the server counted those requests as answered
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    counted = sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "weld_requests_total" and s.labels["route"] == "/v1/predict" and s.labels["status"] == "200"
    )
    assert counted >= 40


def test_run_load_v2_and_by_duration(live_server, weld_pngs):
    url, _ = live_server
    v2 = run_load(url, weld_pngs[:3], kind="v2", concurrency=2, n_requests=10)
    assert (v2.requests, v2.errors, v2.statuses) == (10, 0, {"200": 10})
    timed = run_load(url, weld_pngs[:2], concurrency=2, n_requests=None, duration_s=0.3)
    assert timed.requests > 0 and timed.errors == 0 and len(timed.latencies_ms) == timed.requests


def test_run_load_counts_errors(live_server, weld_pngs):
    url, _ = live_server
    wrong = run_load(url, weld_pngs[:1], kind="mlflow", concurrency=2, n_requests=6)  # our server has no /invocations
    assert (wrong.requests, wrong.errors, wrong.statuses) == (6, 6, {"404": 6})
    assert wrong.latencies_ms == [] and wrong.throughput == 0.0 and math.isnan(wrong.p(50))
    refused = run_load("http://127.0.0.1:9", weld_pngs[:1], concurrency=1, n_requests=2, timeout_s=5)
    assert refused.errors == 2 and set(refused.statuses) == {"ConnectError"}
