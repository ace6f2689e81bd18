"""Summaries of a benchmark run: percentiles, the per-level JSON and the printed table."""

from __future__ import annotations

import statistics


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    s = sorted(values)

    def pct(q: float) -> float:  # linear interpolation, as numpy's default
        pos = (len(s) - 1) * q
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"mean": statistics.fmean(s), "median": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


COLUMNS = [
    ("conc", lambda r: r["concurrency"], "{:>5}"),
    ("ok", lambda r: r["completed"], "{:>5}"),
    ("fail", lambda r: r["failed"], "{:>5}"),
    ("req/s", lambda r: r["request_throughput"], "{:>8.2f}"),
    ("out tok/s", lambda r: r["output_throughput"], "{:>10.1f}"),
    ("tot tok/s", lambda r: r["total_token_throughput"], "{:>10.1f}"),
    ("tok/s/user", lambda r: r["output_tps_per_user"]["median"], "{:>11.1f}"),
    ("TTFT p50", lambda r: r["ttft_ms"]["median"], "{:>9.1f}"),
    ("TTFT p99", lambda r: r["ttft_ms"]["p99"], "{:>9.1f}"),
    ("TPOT p50", lambda r: r["tpot_ms"]["median"], "{:>9.2f}"),
    ("ITL p99", lambda r: r["itl_ms"]["p99"], "{:>8.2f}"),
    ("E2E p50", lambda r: r["e2e_ms"]["median"], "{:>9.1f}"),
]


def table(results: list[dict]) -> str:
    head = " ".join(f"{name:>{len(fmt.format(0)) if 'f' not in fmt else int(fmt[3:].split('.')[0])}}"
                    for name, _, fmt in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(" ".join(fmt.format(get(r)) for _, get, fmt in COLUMNS))
    if results and results[0].get("cost_per_million_output_tokens") is not None:
        lines.append("")
        for r in results:
            lines.append(f"concurrency {r['concurrency']}: {r['output_throughput_per_gpu']:.1f} output tok/s per GPU, "
                         f"${r['cost_per_million_output_tokens']:.3f} per million output tokens")
    lines.append("(latencies in ms; tok/s/user = output tokens per second each client sees after its first token)")
    return "\n".join(lines)
