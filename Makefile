# The two commands a fresh machine needs:  make demo   and   make test
# Both create (or reuse) .venv in the repo and install what they need themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export MPLBACKEND := Agg

.PHONY: install prometheus demo demo-rl test test-unit lint crd clean

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch (asked for by anything below) would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[trainer,test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install  ## the tiny local RLoop run (examples/tiny.yaml): table + report in ./rloop-runs/default/tiny/
	$(BIN)/rloop run examples/tiny.yaml

demo-rl: install  ## the vanilla-RL baseline with the same RL budget, then a side-by-side report
	$(BIN)/rloop run examples/tiny-rl.yaml
	$(BIN)/rloop report tiny tiny-rl

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

test: lint prometheus  ## the whole suite: lint, import contracts, unit and integration tests
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest -m "not integration"

crd: install  ## regenerate crds/rlooprun.yaml from rloop/spec.py
	$(BIN)/python -m rloop.crd --write

clean:
	rm -rf rloop-runs .pytest_cache .ruff_cache
