# Everything a fresh machine needs: `make serve` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# tinker-cookbook is pinned and installed without its declared dependencies: its wheel requires tml-renderers>=0.4.1,
# which PyPI does not have; the rest of its dependencies come from the "cookbook" extra (see pyproject.toml).
COOKBOOK := tinker-cookbook==0.6.1

.PHONY: install browser vllm test test-fast test-slow lint serve pull bench clean

# The tiers `make test-fast` leaves out (the markers are described in pyproject.toml and CONTRIBUTING.md).
NOT_FAST := slow or e2e or oldsdk or cookbook or integration or fuzz or weights or heavy or postgres or vllm or browser or loops or openai or distributed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on this machine's disk; installing it first keeps pip from pulling a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(COOKBOOK)
	touch $(STAMP)

install: $(STAMP)

# The console's browser tests drive Debian's chromium (Playwright's own browser builds are never downloaded).
browser:
	@command -v chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# vLLM as the sampling engine (`tinkerd serve --sampler vllm`): its own environment under ~/.cache/tinkerd/vllm-venv/,
# built once (about 3.5 GB, a few minutes; pip's progress is shown), then cached.
vllm: $(STAMP)
	$(PY) -m scripts.install_vllm

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts examples
	$(VENV)/bin/ruff format --check src tests bench scripts examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pyright

test: lint browser vllm
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# The inner loop: unit tests only (domain, store, planner, api, engine, cli), no lint; about a minute.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m 'not ($(NOT_FAST))'

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow

pull: $(STAMP)
	$(VENV)/bin/tinkerd models pull

serve: pull
	$(VENV)/bin/tinkerd serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
