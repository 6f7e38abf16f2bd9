# Two commands do all the set-up: `make test` and `make demo` create and fill the virtual
# environments when they are missing, and reuse them when they are there.
PYTHON ?= python3
VENV := .venv
CORE_VENV := .venv-core
# The newest torch on this machine, for the torch-only run of the core tests.
CORE_TORCH ?= torch==2.13.0

# llm-foundry as its users run it (about 9 min and 7 GB the first time: it pins torch 2.7.0, mosaicml 0.32.1).
LLMFOUNDRY_VENV := .venv-llmfoundry
LLMFOUNDRY ?= llm-foundry==0.22.0

# The test runner outside .venv (pytest 9.2 ignores the node ids pytest-xdist 3.8 rewrites for loadgroup).
PYTEST := "pytest>=8,<9.2" "pytest-xdist>=3.5"

# The documentation site (mkdocs-material; the API pages are read from the source, so no torch is needed).
DOCS_VENV := .venv-docs

.PHONY: test test-core fuzz lint demo bench gpu-check spikes clean llmfoundry-check wheel-check docs

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

$(CORE_VENV)/.installed: pyproject.toml
	test -x $(CORE_VENV)/bin/python || $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q "$(CORE_TORCH)" "omegaconf>=2.3" $(PYTEST) "hypothesis>=6.100"
	$(CORE_VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(LLMFOUNDRY_VENV)/.installed: pyproject.toml
	test -x $(LLMFOUNDRY_VENV)/bin/python || $(PYTHON) -m venv $(LLMFOUNDRY_VENV)
	# protobuf<6 (what wandb<0.19 needs): without it pip backtracks through dozens of wandb releases
	$(LLMFOUNDRY_VENV)/bin/pip install -q "$(LLMFOUNDRY)" "protobuf>=4.25.1,<6" $(PYTEST)
	$(LLMFOUNDRY_VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(DOCS_VENV)/.installed: pyproject.toml
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/pip install -q "mkdocs-material" "mkdocstrings[python]"
	$(DOCS_VENV)/bin/pip install -q --no-deps -e .
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint docs $(VENV)/.installed test-core
	$(VENV)/bin/python -m pytest

# The functional core on the newest torch, with Composer absent (Composer tests skip themselves).
test-core: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/python -m pytest -m "not composer"

# The differential fuzz tests with thousands of examples each (``make test`` runs a bounded, fixed set).
fuzz: $(CORE_VENV)/.installed
	HYPOTHESIS_PROFILE=fuzz $(CORE_VENV)/bin/python -m pytest tests/test_fuzz.py

# The main job: the adding problem trained with and without clipping, a table and runs/demo*/comparison.png.
demo: $(VENV)/.installed
	$(VENV)/bin/python -m gradclip_algo.train.demo

bench: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks.bench_clipping

# On one CUDA GPU, in under 8 min: the tests marked cuda (Composer under amp_bf16 / amp_fp16, no host sync
# when folded, folded equals unfolded), then the benchmark's CUDA tables, bounded, into
# benchmarks/RESULTS-gpu.md. Without CUDA it says so in one line and fails (exit status 2).
gpu-check: $(VENV)/.installed
	$(VENV)/bin/python scripts/gpu_check.py

# An lr sweep after Wortsman et al. (2023) on a small byte-level transformer: every clipping type at 7 learning
# rates (3e-4 to 3e-1) over 3 seeds; LR sensitivity, instability signals, verdicts, runs/demo_lm*/*.png.
.PHONY: demo-lm
demo-lm: $(VENV)/.installed
	$(VENV)/bin/python -m gradclip_algo.train.demo_lm

# A bad batch in the adding problem: no clipping, a fixed norm threshold and the statistics-driven types.
spikes: $(VENV)/.installed
	$(VENV)/bin/python examples/spike_comparison.py

# The algorithm through llm-foundry's registry, then a tiny MPT trained by llm-foundry's train entry point
# with `algorithms: {gradclip_algo: ...}` (local data and tokenizer, CPU, fp32), its metrics checked.
llmfoundry-check: $(LLMFOUNDRY_VENV)/.installed
	$(LLMFOUNDRY_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_llmfoundry.py
	HF_HUB_OFFLINE=1 $(LLMFOUNDRY_VENV)/bin/python scripts/llmfoundry_check.py

# The wheel in a fresh torch-only venv (also part of `make test-core`).
wheel-check: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/python -m pytest -q -m wheel tests/test_wheel.py

# The documentation site into site/; broken links and references fail the build.
docs: $(DOCS_VENV)/.installed
	$(DOCS_VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(CORE_VENV) $(LLMFOUNDRY_VENV) $(DOCS_VENV) site runs .pytest_cache .ruff_cache build dist
