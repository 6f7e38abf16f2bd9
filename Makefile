# Two commands do all the set-up: `make test` and `make demo` create and fill the virtual
# environments when they are missing, and reuse them when they are there.
PYTHON ?= python3
VENV := .venv
CORE_VENV := .venv-core
# The newest torch on this machine, for the torch-only run of the core tests.
CORE_TORCH ?= torch==2.13.0

.PHONY: test test-core lint demo bench spikes clean

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

$(CORE_VENV)/.installed: pyproject.toml
	test -x $(CORE_VENV)/bin/python || $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q "$(CORE_TORCH)" "omegaconf>=2.3" "pytest>=8" "hypothesis>=6.100"
	$(CORE_VENV)/bin/pip install -q --no-deps -e .
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint $(VENV)/.installed test-core
	$(VENV)/bin/python -m pytest

# The functional core on the newest torch, with Composer absent (Composer tests skip themselves).
test-core: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/python -m pytest -m "not composer"

# The main job: the adding problem trained with and without clipping, a table and runs/demo*/comparison.png.
demo: $(VENV)/.installed
	$(VENV)/bin/python -m gradclip_algo.train.demo

bench: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks.bench_clipping

# A small transformer language model whose unclipped AdamW run spikes, against every clipping type over
# 3 seeds: calibration, tables and runs/demo_lm*/{loss,grad_norms,layer_norms}.png.
.PHONY: demo-lm
demo-lm: $(VENV)/.installed
	$(VENV)/bin/python -m gradclip_algo.train.demo_lm

# A bad batch in the adding problem: no clipping, a fixed norm threshold and the statistics-driven types.
spikes: $(VENV)/.installed
	$(VENV)/bin/python examples/spike_comparison.py

clean:
	rm -rf $(VENV) $(CORE_VENV) runs .pytest_cache .ruff_cache
