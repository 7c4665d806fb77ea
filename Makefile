# Quick start targets. Each sets up what it needs in .venv (Python 3.11 + pinned torch): `serve` the
# runtime alone, `test` the runtime plus the `test` extra.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On Linux x86-64, PyPI's `torch` is a CUDA build (several GB with its nvidia-* wheels). Choose the
# build with PyTorch's wheel index, e.g.
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu     (CPU only, ~200 MB)
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128   (CUDA 12.8)
# Empty: pip's own configuration decides (PyPI, or a local wheel directory).
TORCH_PIN ?= torch==2.13.0
TORCH_INDEX ?=
# One stamp per layer: the test layer is redone whenever the runtime layer is (a changed pyproject.toml).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: venv venv-test prometheus test serve bench train-demo clean

venv: $(STAMP)

venv-test: $(TEST_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

# The metrics tests scrape a live server with a real Prometheus (Debian's package). As root this
# installs it with apt; otherwise those tests are reported as not run in the test summary.
prometheus:
	@if [ "$$(id -u)" = 0 ]; then sh scripts/ensure_prometheus.sh; \
	else sh scripts/ensure_prometheus.sh || echo "make: continuing without Prometheus (its tests will be listed as not run)"; fi

test: venv-test prometheus
	$(PY) -m pytest -q tests

serve: venv
	$(VENV)/bin/sizewise serve

bench: venv
	$(PY) benchmarks/decode.py

train-demo: venv
	$(PY) scripts/train_demo_family.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
