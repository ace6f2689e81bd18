"""`make demo`'s program runs to its printed table and stops its server cleanly."""

import subprocess
import sys


def test_demo_runs_to_its_table(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moeserve.cli", "demo", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tok/s/user" in out.stdout and "server stopped (exit 0)" in out.stdout
    assert len(list((tmp_path / "bench").glob("bench-*.json"))) == 3
