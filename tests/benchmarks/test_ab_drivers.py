"""The A/B drivers' kernel forms against each other, on CPU through Triton's interpreter: the per-token threshold
by bisection (the product's) and by thirds (benchmarks/threshold_ab.py), and the four forms of the compact down
buffer's gather, the product's ``index_select`` among them (benchmarks/gather_ab.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("module, passed", [("benchmarks.threshold_ab", "threshold thirds = bisection: passed"),
                                            ("benchmarks.gather_ab", "gather forms equal: passed")])
def test_driver_forms_agree(module, passed):
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-m", module, "--check"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert passed in r.stdout
