# The two commands a newcomer needs: `make demo` (run a federation) and `make test` (the whole suite).
# Both build their own virtual environment first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in before anything that depends on it, so pip cannot pick a multi-GB CUDA build for opacus.
# Elsewhere, point TORCH_PIP_ARGS at a CPU-only wheel index (e.g. --index-url <your CPU wheel index>).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv test lint typecheck pytest demo broker helm images e2e-containers e2e-kind bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

broker:
	@bash scripts/ensure-broker.sh

helm:
	@bash scripts/install-helm.sh

lint: venv
	$(BIN)/ruff check shared services tests e2e bench scripts
	$(BIN)/ruff format --check shared services tests e2e bench scripts

typecheck: venv
	$(BIN)/mypy shared/tessera services

pytest: venv broker helm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

images:
	TORCH_SPEC="$(TORCH_SPEC)" TORCH_PIP_ARGS="$(TORCH_PIP_ARGS)" bash scripts/build-images.sh

# The rendered charts as real containers (docker; starts dockerd when root and none runs, and stops it again).
# Builds the images first. Minutes, so not part of `make test`.
e2e-containers: venv helm
	TORCH_SPEC="$(TORCH_SPEC)" TORCH_PIP_ARGS="$(TORCH_PIP_ARGS)" bash e2e/containers/run.sh

# Needs Docker and kind (not available on every host): a real cluster, the images, three companies.
e2e-kind: venv helm
	bash e2e/kind/run.sh

demo: venv
	$(BIN)/python -m tessera.apps.demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
