"""benchmarks/ep_engine_bench.py runs end to end on CPU (gloo, the tiny V3 model, every mode) and
writes its report: the device runs of issue 6 cost device time when the script breaks."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ep_engine_bench_cpu_smoke(tmp_path):
    out = tmp_path / "ep_engine"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ep_engine_bench.py"), "--device", "cpu", "--nproc", "2",
           "--modes", "ep,tp,tpep", "--batch", "4", "--isl", "32", "--osl", "4", "--commit", "smoke", "--out", str(out),
           "--ll-transports", "collective,peer"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    # greedy tokens of every parallel mode equal one process's (gloo, fp32)
    runs = {(r["run"], r["backend"]) for r in report["correctness"]}
    assert {("dp2/ep2", "ht, eager"), ("dp2/ep2", "ll, eager"), ("dp1/tp2/ep2", "token shares, eager"),
            ("tp2", "all_reduce, eager")} <= runs
    assert all(r["sequences_equal"] == r["sequences"] == 3 for r in report["correctness"])
    # one GPU (asynchronous and synchronous scheduling), both EP wires over both transports, tp x ep and tp:
    # every token out
    rows = report["throughput"]
    assert len(rows) == 8 and all(r["output_tokens"] == r["gpus"] * 4 * 4 for r in rows)  # 4 requests/GPU x 4
    assert sum(r.get("ll_transport") == "peer" for r in rows) == 2
    assert "mxfp4+fp8, peer memory" in out.with_suffix(".md").read_text()
    assert all(r["kernels_compiled_in_timed_run"] == 0 for r in rows)  # no Triton on plain CPU
    assert "Triton compiles in the timed run" in out.with_suffix(".md").read_text()
