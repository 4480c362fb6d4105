# Two entry points (see README): `make demo` sets everything up and runs the main job,
# `make test` sets up if needed and runs the linter and the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
# The set-up pins torch; on a GPU machine override it, e.g. `make demo TORCH_SPEC=torch` to keep yours.
TORCH_SPEC ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.wanstream-installed

.PHONY: setup demo test lint browsers conformance clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(BIN)/wanstream generate --demo -o outputs/demo.mp4

conformance: setup
	$(BIN)/python -m wanstream.conformance tests/golden

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests docs README.md  # docs: their Python blocks

# The studio's browser tests need Chromium (and Firefox): installed here when missing, where possible.
browsers:
	@bash tools/ensure_browser.sh

test: setup lint browsers
	@# pytest exits 5 when it collects no test: treat that as a failure, not a pass.
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
