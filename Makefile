# Two commands do all set-up on a fresh Linux machine (each creates or reuses .venv):
#   make demo   the main job: dense vs RAS sampling loop, prints a comparison table (ARGS="--help" for options)
#   make test   the test suite (without a CUDA GPU: Triton kernels under TRITON_INTERPRET=1, two parallel processes)
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

# Without a CUDA GPU the suite runs under the Triton interpreter as two shards (--shard, conftest.py) in parallel
# processes of one torch thread each (on a 2-core CI machine in session 20 the longer shard took 8.4 minutes, against
# 13.4 in one process and 10.4 with two threads a shard); the second shard's output follows the first's.
# pytest's exit code 5 (no tests collected; in both shards) becomes success with a message, since make would report
# any failing recipe as its own exit code 2.
test: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m pytest $(ARGS); a=$$?; b=5; \
	else \
		log=$$(mktemp); export TRITON_INTERPRET=1 OMP_NUM_THREADS=1; \
		$(PY) -m pytest --shard 1/2 $(ARGS) > $$log 2>&1 & pid=$$!; \
		$(PY) -m pytest --shard 0/2 $(ARGS); a=$$?; \
		wait $$pid; b=$$?; echo "== the second shard (--shard 1/2)"; cat $$log; rm -f $$log; \
	fi; \
	if [ $$a -eq 5 ] && [ $$b -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; \
	for rc in $$a $$b; do [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc; done

bench: $(STAMP)
	$(PY) -m bench.kernels $(ARGS)

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
