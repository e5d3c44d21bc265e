"""The one-launch decode step's arithmetic, task numbering and counter reset on CPU, through Triton's
interpreter (benchmarks/megakernel_check.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_megakernel_in_triton_interpreter():
    """Against the reference step: dense / sparse / per-layer k, Llama / Mistral window / Qwen2 biases, the
    token picked in the launch = the separate kernel's, top-k / top-p, OPT refused."""
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, "-m", "benchmarks.megakernel_check"], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "megakernel ok" in r.stdout
