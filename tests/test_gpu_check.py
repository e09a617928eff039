"""benchmarks/gpu_check.py, the script a lent GPU runs first: its plan prints anywhere, and its
correctness part runs end to end on CPU at toy sizes (so the GPU's few minutes are not spent on a
bug in the script)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_prints_both_parts_and_what_it_cannot_check():
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "unused",
                             "--dry-run"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    for needle in ("## part correctness", "## part perf", "torch-varlen", "flex",
                   "set_sync_debug_mode", "## not checkable here", "NCCL"):
        assert needle in result.stdout, needle
    assert not os.path.exists("unused")


@pytest.mark.slow
def test_correctness_part_runs_on_cpu_at_toy_sizes(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                             "--device", "cpu", "--tiny", "--part", "correctness", "--out",
                             str(out)], capture_output=True, text=True, timeout=280,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "correctness.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| sdpa")]
    assert len(rows) == 4 and all("ok" in row for row in rows), rows  # 3 kernel cases + training
    assert re.search(r"\| (\d+)/\1 tensors equal \| ok \|", table), table
    assert "ok (equal)" in table
    assert table.count("| ok |") >= 2  # state after load, and the export's perplexity
    assert "FAILED" not in table and "TOO FAR" not in table
