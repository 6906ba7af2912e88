# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-all lint docs bench bench-sites ablation clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medtune demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Rewrite the generated settings table of docs/configuration.md from medtune.config.TrainConfig.
docs: $(STAMP)
	$(BIN)/python -m medtune.cli.settings docs/configuration.md

bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/run.py

# Leave-one-site-out benchmark (not a test) over ../shared/data's aptos2019-224, eyepacs-dev and
# idrid-800; rewrites its table in docs/generalisation.md. Exits 2 without the data.
bench-sites: $(STAMP)
	$(BIN)/python benchmarks/sites.py --loso --recipes default,site-balance,mixstyle,swad,constant-lr,sord,dsu --few-labels 25,50,100,200

ablation: $(STAMP)
	$(BIN)/python benchmarks/ablation.py --skip probe-large

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
