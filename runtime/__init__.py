"""coreinfer runtime: load a model, pick each prompt's core FFN neurons, decode with the compact FFN.

Light on purpose: torch, transformers, zarr (artifacts) and sentence-transformers (similarity-guided
prompts) only; the calibration pipeline's Hydra/DVC/HDBSCAN never load here.
"""

from .loading import ALIASES, DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from .selection import stability_select
from .sparse_lm import GenerateOutput, ScoreOutput, SparseLM, Stats

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "load_model", "stability_select",
    "GenerateOutput", "ScoreOutput", "SparseLM", "Stats",
]
