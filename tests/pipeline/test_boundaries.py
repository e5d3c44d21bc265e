"""The runtime stays light: artifact reading and similarity assignment never import the pipeline's stack."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_does_not_import_pipeline_dependencies(tmp_path):
    code = f"""
import sys
import numpy as np
from coreinfer.runtime import SparseLM
from coreinfer.runtime.artifact import write_artifact, read_artifact
from coreinfer.runtime.similarity import nearest_cluster, similarity_session
from tests.pipeline.synthetic import synthetic_artifact_inputs
arrays, attrs, _ = synthetic_artifact_inputs()
art = read_artifact(write_artifact({str(tmp_path / 'a.zarr')!r}, arrays, attrs))
nearest_cluster(art.centroids[0], art.centroids, art.radii)
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'dvc', 'hdbscan', 'umap', 'omegaconf', 'coreinfer') and
             not m.startswith('coreinfer.runtime') and m != 'coreinfer')
print(bad)
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert r.returncode == 0, r.stdout + r.stderr
