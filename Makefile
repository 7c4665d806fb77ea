# Quick start targets. Each sets up what it needs in .venv (Python 3.11 + pinned CPU torch).
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
STAMP := $(VENV)/.installed

.PHONY: venv prometheus test serve bench train-demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The metrics tests scrape a live server with a real Prometheus (Debian's package; root + apt).
prometheus:
	sh scripts/ensure_prometheus.sh

test: venv prometheus
	$(PY) -m pytest -q tests

serve: venv
	$(VENV)/bin/sizewise serve

bench: venv
	$(PY) benchmarks/decode.py

train-demo: venv
	$(PY) scripts/train_demo_family.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
