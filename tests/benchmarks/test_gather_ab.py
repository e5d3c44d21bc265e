"""The gather A/B driver's four forms of the compact down buffer's gather fill the same buffer (the product's
``index_select`` form among them), on CPU through Triton's interpreter (benchmarks/gather_ab.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gather_forms_fill_the_same_buffer():
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-m", "benchmarks.gather_ab", "--check"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gather forms equal: passed" in r.stdout
