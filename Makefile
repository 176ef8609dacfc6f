# Two commands do all set-up on a fresh Linux machine (each creates or reuses .venv):
#   make demo   the main job: dense vs RAS sampling loop, prints a comparison table (ARGS="--help" for options)
#   make test   the test suite (Triton kernels under TRITON_INTERPRET=1 when there is no CUDA GPU)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ras-installed

.PHONY: demo test bench lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[models,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bench.e2e $(ARGS)

test: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m pytest $(ARGS); \
	else \
		TRITON_INTERPRET=1 $(PY) -m pytest $(ARGS); \
	fi

bench: $(STAMP)
	$(PY) -m bench.kernels $(ARGS)

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
