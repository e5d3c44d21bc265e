"""The Triton kernels of the decode step and the selection against plain PyTorch, on CPU, through Triton's
interpreter (benchmarks/interpreter_check.py)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_attention_kernel_math_in_triton_interpreter():
    """The Triton decode kernels against plain PyTorch, run on CPU by Triton's interpreter (skips where triton
    is not installed): attention (RoPE, cache write, GQA, sliding window, split-KV softmax) and the GEMV
    (bias, fused activations, gate||up, ragged K), one program per block and persistent."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-m", "benchmarks.interpreter_check"], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok") == 8 and "gemv ok" in r.stdout and "persistent gemv ok" in r.stdout
    # the gather-free decode (indexed GEMVs, end to end on tiny models) and the selection kernels
    for line in ("gemv_rows passed", "residual norm + argmax passed", "sampling draw passed", "select_kernels passed",
                 "indexed decode passed"):
        assert line in r.stdout, r.stdout + r.stderr
