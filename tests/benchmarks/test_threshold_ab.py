"""The threshold A/B driver's two kernels (bisection, the product's; search by thirds, measured and not kept) give
the same per-token thresholds and tie indices, on CPU through Triton's interpreter (benchmarks/threshold_ab.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_threshold_search_by_thirds_equals_bisection():
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-m", "benchmarks.threshold_ab", "--check"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "threshold thirds = bisection: passed" in r.stdout
