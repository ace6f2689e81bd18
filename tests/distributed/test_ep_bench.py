"""benchmarks/ep_bench.py runs end to end on CPU (gloo, small shapes) and writes its report."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ep_bench_cpu_smoke(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ep_bench.py"), "--device", "cpu", "--nproc", "2",
           "--hidden", "256", "--experts", "16", "--topk", "4", "--tokens", "4,16", "--warmup", "1", "--iters", "2",
           "--timeout", "60", "--out", str(tmp_path), "--backends", "ht,ll,ll2,llp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ep_bench.json").read_text())
    assert len(report["rows"]) == 2 * 3 * 4 and len(report["all_to_all"]) == 2
    row = next(r for r in report["rows"] if r["format"] == "mxfp4+fp8")
    assert row["bytes_per_token_round_trip"] == 256 // 2 + 256 // 32 + 256 + 4 * 2
    assert all(r["round_trip_us"] > 0 and r["wire_bytes_per_rank"] > 0 for r in report["rows"])
    assert "16 tokens/rank, ll2: mxfp4+fp8 / bf16 round trip" in proc.stdout  # the table comes last
    assert "16 tokens/rank, llp: mxfp4+fp8 / bf16 round trip" in proc.stdout
    assert (tmp_path / "ep_bench.md").read_text().count("| 16 |") == 3 * 4 + 1
    bad = subprocess.run(cmd[:-2] + ["--backends", "ll0"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "--backends" in bad.stderr


def test_ep_bench_fp8_experts_smoke(tmp_path):
    """--fp8-experts: the received rows handed over as FP8 groups, for every backend; --ll-capacity:
    a low-latency buffer larger than the step (padding rows: zeros on the collective wire, metadata
    only on the peer one)."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ep_bench.py"), "--device", "cpu", "--nproc", "2",
           "--hidden", "256", "--experts", "16", "--topk", "4", "--tokens", "8", "--warmup", "1", "--iters", "2",
           "--timeout", "60", "--out", str(tmp_path), "--backends", "ht,ll,llp", "--fp8-experts", "--ll-capacity", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "ep_bench.json").read_text())["rows"]
    assert len(rows) == 3 * 3 and all(r["fp8_experts"] and r["round_trip_us"] > 0 for r in rows)
    ll = {r["backend"]: r for r in rows if r["format"] == "bf16" and r["backend"] != "ht"}
    assert ll["ll"]["ll_capacity"] == ll["llp"]["ll_capacity"] == 16
    assert ll["llp"]["wire_bytes_per_rank"] < ll["ll"]["wire_bytes_per_rank"] / 2
