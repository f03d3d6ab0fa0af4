"""A closed-loop load generator and latency percentiles. Chapter: "Serving predictions" (latency, throughput).

Closed loop: N clients each send a request, wait for the answer, and send the next. Throughput is what the server
sustains at that concurrency, and latency includes queueing, which is what a user on the line would see. Report
percentiles, not averages: a mean hides the slow tail that makes an inspection station stall (p99 = the latency
that 1 request in 100 exceeds).

Traffic goes to loopback only in this course; requests are bounded by count and time, and the run stops by itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the data at or below it.

    Unlike interpolating definitions, it always returns a latency that was actually observed, and it is the
    definition most SLO documents use. ``q`` is in (0, 100].
    """
    if len(values) == 0:  # len(), not truthiness: a numpy array of timings has no single truth value
        raise ValueError("percentile of an empty list is undefined")
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], got {q}")
    ordered = sorted(values)
    # q * n / 100 rather than q / 100 * n: in floating point 7 / 100 * 100 is 7.000000000000001, whose ceiling
    # would skip a rank. The tiny tolerance absorbs the same rounding for fractional q such as 99.9.
    rank = max(1, math.ceil(q * len(ordered) / 100 - 1e-9))
    return ordered[rank - 1]


@dataclass
class LoadResult:
    target: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.errors) / self.seconds if self.seconds > 0 else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q) if self.latencies_ms else float("nan")

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        out.update({"throughput_rps": round(self.throughput, 1), "p50_ms": round(self.p(50), 2),
                    "p95_ms": round(self.p(95), 2), "p99_ms": round(self.p(99), 2)})  # fmt: skip
        return out


def build_request(kind: str, payload: bytes, model_name: str = "weld-defect") -> tuple[str, dict[str, str], bytes]:
    """(path, headers, body) for one image in the given protocol: ``v1`` raw PNG, ``v2`` JSON BYTES tensor,
    ``mlflow`` (the ``/invocations`` JSON of ``mlflow models serve``)."""
    if kind == "v1":
        return "/v1/predict", {"content-type": "image/png"}, payload
    b64 = base64.b64encode(payload).decode()
    if kind == "v2":
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}
        return f"/v2/models/{model_name}/infer", {"content-type": "application/json"}, json.dumps(body).encode()
    if kind == "mlflow":
        body = {"dataframe_split": {"columns": ["image"], "data": [[b64]]}}
        return "/invocations", {"content-type": "application/json"}, json.dumps(body).encode()
    raise ValueError(f"unknown request kind {kind!r}; use v1, v2 or mlflow")


async def _run(base_url: str, kind: str, payloads: Sequence[bytes], concurrency: int, n_requests: int | None,
               duration_s: float | None, timeout_s: float) -> LoadResult:  # fmt: skip
    import httpx

    if not payloads:
        raise ValueError("need at least one image payload")
    if n_requests is None and duration_s is None:
        raise ValueError("give a request count or a duration (the load test must stop by itself)")
    requests = [build_request(kind, p) for p in payloads]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors = 0
    sent = 0
    deadline = time.perf_counter() + duration_s if duration_s else math.inf

    def claim() -> int | None:
        nonlocal sent
        if (n_requests is not None and sent >= n_requests) or time.perf_counter() >= deadline:
            return None
        sent += 1
        return sent - 1

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while (i := claim()) is not None:
            path, headers, body = requests[i % len(requests)]
            start = time.perf_counter()
            try:
                response = await http.post(path, content=body, headers=headers)
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            elapsed = (time.perf_counter() - start) * 1000
            statuses[status] += 1
            if status == "200":
                latencies.append(elapsed)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return LoadResult(kind, concurrency, sent, errors, seconds, latencies, dict(statuses))


def run_load(
    base_url: str,
    payloads: Sequence[bytes],
    *,
    kind: str = "v1",
    concurrency: int = 1,
    n_requests: int | None = 200,
    duration_s: float | None = None,
    timeout_s: float = 30.0,
) -> LoadResult:
    """Run a closed-loop load test against a server on ``base_url`` (e.g. ``http://127.0.0.1:8000``)."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    coro = _run(base_url, kind, payloads, concurrency, n_requests, duration_s, timeout_s)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from code that already runs an event loop (a Jupyter kernel): use a private loop in a thread.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
