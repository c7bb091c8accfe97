# crmt_nb — the README's commands. Each target does its own set-up on a fresh machine (Python 3.11).
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PROFILE ?= mini
OUT     ?= runs/$(PROFILE)
WORKERS ?= 2
STAMP   := $(VENV)/.crmt_nb-installed

.PHONY: install reproduce test lab export readme clean figures

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# editable install with the dev extras, and the `python3` kernel papermill uses, registered inside the venv
$(STAMP): $(BIN)/python settings.ini setup.py
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# every experiment notebook of the registry, through papermill, with the `mini` profile by default;
# WORKERS notebooks at once (training runs on one CPU thread per notebook, see crmt_nb.core.num_threads)
reproduce: $(STAMP)
	$(BIN)/crmt-reproduce --profile $(PROFILE) --out $(OUT) --workers $(WORKERS) $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

# copy the committed-to-be figures of a mini run into figures/
figures: $(STAMP)
	$(BIN)/crmt-reproduce --profile mini --out runs/mini --workers $(WORKERS) --figures figures

# sync and cleanliness checks come first (tests/test_00_sync.py), then the package and notebook tests
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

export: $(STAMP)
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	$(BIN)/jupyter nbconvert --to markdown --stdout --log-level ERROR nbs/index.ipynb > README.md

# README.md is nbs/index.ipynb rendered (tests/test_00_sync.py checks they agree)
readme: $(STAMP)
	$(BIN)/jupyter nbconvert --to markdown --stdout --log-level ERROR nbs/index.ipynb > README.md

lab: $(STAMP)
	$(BIN)/jupyter lab nbs

clean:
	rm -rf runs _proc _docs .pytest_cache *.egg-info
	find . -name __pycache__ -prune -not -path './$(VENV)/*' -exec rm -rf {} +
