# lifecycle: two commands on a fresh machine with Python 3.11 and make.
#   make run    creates .venv, installs the pinned package, runs the lifecycle on the default project
#   make test   the same venv plus dev tools, runs every check CI runs
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# The venv's installer: uv, pinned, put into the venv by pip. It fetches and installs the locked packages in parallel
# (a clean clone's venv: 3 min wall and 9 s CPU at load 28, cache cold, against pip's 7 min and more); its cache
# (~/.cache/uv) makes the next clean venv on the machine a copy.
UV_VERSION := 0.13.8
UV := $(BIN)/uv pip install --python $(BIN)/python -q

.PHONY: run test lab bench sync-check lint nbdev-test pytest lock clean mlflow-venv evidently-venv nannyml-venv screenshots example-pictures docs

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(PIP) install "uv==$(UV_VERSION)"
	$(UV) -c requirements.lock -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(UV) -c requirements.lock -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/lifecycle run --settings settings.ini

# The notebooks' checks and pytest run side by side, and pytest on four workers for two cores: much of its time is
# waiting (servers starting, `lifecycle` commands, browsers), which would leave a core idle. Each one's output is printed
# whole when it ends (the notebooks' first: they take minutes, pytest most of the run); a failure in either fails
# the target, after both have run.
test: $(VENV)/.installed-dev sync-check lint
	@$(MAKE) --no-print-directory -j 2 --output-sync=target nbdev-test pytest

# nbs/ is the source; lifecycle/ must be exactly what nbdev-export makes of it.
sync-check: $(VENV)/.installed-dev
	@before="$$(git status --porcelain)"; \
	$(BIN)/nbdev-clean && $(BIN)/nbdev-export; \
	after="$$(git status --porcelain)"; \
	if [ "$$before" != "$$after" ]; then \
		echo "nbs/ and lifecycle/ are out of sync: nbdev-clean && nbdev-export changed files:"; git status --short; exit 1; \
	fi; echo "nbs/ and lifecycle/ in sync"

# ruff, line length 120 (pyproject.toml): the notebooks and tests formatted, everything linted (the generated modules too,
# so an import only a notebook's demonstration uses is caught in its export cell).
lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check --quiet nbs tests docs
	$(BIN)/ruff check --quiet nbs lifecycle tests docs

nbdev-test: $(VENV)/.installed-dev
	$(BIN)/nbdev-test --n-workers 2

pytest: $(VENV)/.installed-dev
	$(BIN)/pytest -n 4 --dist worksteal --durations=30

# The documentation site, from the notebooks and the code, into _docs/ (docs/site.py; offline, fails on a broken link
# or a saved cell error). Open _docs/index.html in a browser.
docs: $(VENV)/.installed-dev
	$(BIN)/python docs/site.py --site _docs

lab: $(VENV)/.installed
	$(BIN)/jupyter lab --notebook-dir=nbs

# The README's pictures, from the latest run's report and the live dashboard, taken in Debian's chromium (apt-get install chromium).
screenshots: $(VENV)/.installed-dev
	test -e reports/latest || $(MAKE) run
	ls simulations/*/simulation.json >/dev/null 2>&1 || $(BIN)/lifecycle simulate --days 14 --scale 2 --label-delay 1 --inject bad-model \
		--inject-day 3 --shadow-days 1 --seed 3 -p retrain.min_new_labels=60 -p prepare.profile=false
	$(BIN)/python docs/screenshots.py

# The example projects' pictures in the README: each example's run index and its doctor's page (runs an example first
# when it has no run yet).
example-pictures: $(VENV)/.installed-dev
	$(BIN)/python docs/example_pictures.py

bench: $(VENV)/.installed
	$(BIN)/lifecycle bench prepare

# Refresh requirements.lock after changing the pins in pyproject.toml.
lock:
	rm -rf /tmp/lifecycle-lock && $(PYTHON) -m venv /tmp/lifecycle-lock
	/tmp/lifecycle-lock/bin/python -m pip install -q -e ".[dev]"
	/tmp/lifecycle-lock/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' > requirements.lock

clean:
	rm -rf $(VENV) lifecycle.egg-info

# MLflow's scoring server, for `lifecycle bench serve` to compare against. MLflow needs pyarrow < 26,
# so it gets a venv of its own, with the project's scikit-learn and skops to read the same model file.
mlflow-venv:
	test -x .venv-mlflow/bin/python || $(PYTHON) -m venv .venv-mlflow
	.venv-mlflow/bin/python -m pip --disable-pip-version-check -q install "mlflow==3.17.2" "scikit-learn==1.9.1" "skops==0.16.0" "numpy==2.4.6" "pandas==2.3.3"

# Evidently, for `lifecycle bench monitor` to compare our drift computation against its DataDriftPreset on the same
# data. A bench-only extra in a venv of its own: its pins are not the project's. The bench reads Parquet files there.
evidently-venv:
	test -x .venv-evidently/bin/python || $(PYTHON) -m venv .venv-evidently
	.venv-evidently/bin/python -m pip --disable-pip-version-check -q install "evidently==0.7.23" "pandas==2.3.3" "numpy==2.4.6" "pyarrow==26.0.1"

# NannyML, for `lifecycle bench estimate`, `estimate-multiclass` and `estimate-regression` to compare our performance
# estimates (CBPE, multiclass CBPE, direct loss estimation) with its own on the same chunks. A bench-only extra in a
# venv of its own, as Evidently; nannyml 0.13.1 imports statsmodels without declaring it.
nannyml-venv:
	test -x .venv-nannyml/bin/python || $(PYTHON) -m venv .venv-nannyml
	.venv-nannyml/bin/python -m pip --disable-pip-version-check -q install "nannyml==0.13.1" "statsmodels==0.14.5" "pandas==2.3.3" "numpy==2.4.6" "pyarrow==26.0.1" "scikit-learn==1.9.1"
