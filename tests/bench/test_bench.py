"""`moeserve bench` against the real tiny server at concurrency 1, 4 and 16."""

import json
import subprocess
import sys

from moeserve.bench.report import percentiles

FIELDS = ["completed", "failed", "request_throughput", "input_throughput", "output_throughput",
          "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "output_tps_per_user"]


def test_bench_against_server(server, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "moeserve.cli", "bench", "--url", server.url, "--isl", "24", "--osl", "8",
         "--concurrency", "1,4,16", "--num-prompts", "16", "--out-dir", str(tmp_path), "--num-gpus", "1",
         "--gpu-cost-per-hour", "2.5", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tok/s/user" in out.stdout
    for c in (1, 4, 16):
        result = json.loads((tmp_path / f"bench-isl24-osl8-c{c}.json").read_text())
        assert result["completed"] == 16 and result["failed"] == 0
        assert result["total_input_tokens"] == 16 * 24 and result["total_output_tokens"] == 16 * 8
        for name in FIELDS:
            assert name in result
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "output_tps_per_user"):
            assert set(result[name]) == {"mean", "median", "p90", "p99"}
            assert result[name]["p99"] >= result[name]["median"] > 0
        assert result["cost_per_million_output_tokens"] > 0


def test_bench_reports_failures(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moeserve.cli", "bench", "--url", "http://127.0.0.1:9",
                          "--isl", "4", "--osl", "4", "--vocab-size", "100", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot reach" in out.stderr


def test_percentiles():
    p = percentiles([float(x) for x in range(1, 101)])
    assert p["mean"] == 50.5 and p["median"] == 50.5 and abs(p["p90"] - 90.1) < 1e-9 and abs(p["p99"] - 99.01) < 1e-9
