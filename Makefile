# p2p-reliable developer commands. Every target sets up .venv on first use
# (scripts/setup.sh), and again whenever pyproject.toml or the script changes.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

PKGS       := p2p_reliable router discovery inference_glue exo_swap p2pr
# tests/ and examples/ are linted when they exist (git keeps no empty folders).
LINT_PATHS := $(wildcard $(PKGS) tests examples)

# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k codec -x"`.
PYTEST_ARGS ?=

# pytest's exit code 5 ("no tests collected") is turned into a failure.
define run_pytest
	@$(PY) -m pytest $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	    echo "make: error: pytest collected no tests (exit code 5)" >&2; exit 1; \
	fi; \
	exit $$rc
endef

.PHONY: venv demo demo-sim test lint bench bench-generate bench-loss soak clean distclean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

venv: $(STAMP)

# The whole story on one machine (scripts/demo.sh): a kept 3-node pipeline of the built-in
# SmolLM2 streams an answer, `p2pr health` shows every node's view, the pipeline stops, and a
# new one is checked token for token against mlx-lm.
demo: $(STAMP)
	bash scripts/demo.sh

# The protocol alone: 3 simulated nodes through 20% loss and 2% corruption.
demo-sim: $(STAMP)
	$(VENV)/bin/p2pr demo

test: $(STAMP)
	$(call run_pytest,-q $(PYTEST_ARGS))

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy $(PKGS)

bench: $(STAMP)
	$(VENV)/bin/p2pr bench codec

bench-generate: $(STAMP)
	$(VENV)/bin/p2pr bench generate

# Goodput and token latency against the fraction of dropped frames; writes loss-sweep.png.
bench-loss: $(STAMP)
	$(VENV)/bin/p2pr bench loss-sweep --png loss-sweep.png

soak: $(STAMP)
	$(call run_pytest,-m soak $(PYTEST_ARGS))

# Build outputs and caches; `make distclean` also removes .venv.
clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
