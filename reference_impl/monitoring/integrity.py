"""Data-integrity checks, counted and alerted separately from statistical drift.

Chapter: "Monitoring in production" (data integrity). A new camera that writes 16-bit TIFFs instead of 8-bit PNGs,
an upstream job that suddenly sends thumbnails, a broken share that serves truncated files: these are not
distribution shifts to be tested statistically, they are *contract* violations with a definite cause, and each one
is worth an alert of its own. Volume matters too: half the usual traffic may mean a stopped line or a failing
uploader, not a model problem.

Two kinds of input never become a prediction and would be invisible in the prediction log alone: stored images
the monitor cannot decode again (``unreadable``) and uploads the server refused outright (``rejected``: not an
image, truncated, too large; the server records them in the log's ``rejections`` table). Both are counted, apart,
so the report says which.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def check_window(
    rows: Sequence[dict[str, Any]],
    expected: dict[str, Any],
    *,
    unreadable: int = 0,
    rejected: int = 0,
    previous_rate_per_min: float | None = None,
) -> dict[str, Any]:
    """Integrity of one window of prediction-log rows against the profile's expectations.

    ``unreadable``: stored images of the window that could not be decoded; ``rejected``: uploads the server
    refused as bad input during the window's time span.

    Returns counts per kind of violation, ``failures`` (how many *inputs* failed: a logged image that breaks
    several rules counts once, so the number can be read against the window's size; unreadable and refused inputs
    are added), the formats/sizes seen, and the volume ratio against the previous window (``None`` for the first
    window).
    """
    widths, heights = set(expected.get("widths", [])), set(expected.get("heights", []))
    depths, formats = set(expected.get("bit_depths", [])), set(expected.get("formats", []))
    bad_size = [bool((widths and r["width"] not in widths) or (heights and r["height"] not in heights)) for r in rows]
    bad_depth = [bool(depths and r["bit_depth"] not in depths) for r in rows]
    bad_format = [bool(r.get("input_format") and formats and r["input_format"] not in formats) for r in rows]
    size_mismatch, depth_mismatch, format_mismatch = sum(bad_size), sum(bad_depth), sum(bad_format)
    failed_rows = sum(1 for checks in zip(bad_size, bad_depth, bad_format, strict=True) if any(checks))
    tensor_inputs = sum(1 for r in rows if not r.get("input_format"))
    span_min = (rows[-1]["ts"] - rows[0]["ts"]) / 60 if len(rows) > 1 else 0.0
    rate = len(rows) / span_min if span_min > 0 else None
    ratio = rate / previous_rate_per_min if rate and previous_rate_per_min else None
    counts = {
        "size_mismatch": size_mismatch,
        "bit_depth_mismatch": depth_mismatch,
        "format_mismatch": format_mismatch,
        "unreadable": unreadable,
        "rejected": rejected,
    }
    return {
        **counts,
        "failures": failed_rows + unreadable + rejected,
        "tensor_inputs": tensor_inputs,
        "formats_seen": dict(Counter(r.get("input_format") or "tensor" for r in rows)),
        "sizes_seen": dict(Counter(f"{r['width']}x{r['height']}" for r in rows)),
        "bit_depths_seen": dict(Counter(str(r["bit_depth"]) for r in rows)),
        "rate_per_min": rate,
        "volume_ratio": ratio,
    }
