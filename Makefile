# The two commands of the README. Both create .venv when it is missing and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Ray 2.60 turns token authentication on for local clusters; say so explicitly everywhere.
RAY_AUTH_MODE := $(or $(RAY_AUTH_MODE),token)
export RAY_AUTH_MODE
export PYTHONUNBUFFERED := 1

.PHONY: install demo test clean-demo browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned on its own first: on these machines 2.13.0 is a local CPU wheel.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	# truth.json is written last: without it an earlier generation was interrupted.
	test -f demo-data/truth.json || { rm -rf demo-data && $(VENV)/bin/fedward demo-data --out demo-data --hospitals 3 --seed 0; }
	$(VENV)/bin/fedward simulate configs/demo_images.yaml
	$(VENV)/bin/fedward simulate configs/demo_ehr.yaml
	$(VENV)/bin/fedward compare configs/demo_images.yaml
	$(VENV)/bin/fedward compare configs/demo_ehr.yaml
	$(VENV)/bin/fedward report runs/demo-images
	$(VENV)/bin/fedward report runs/demo-ehr

test: install
	$(PY) -m pytest

# Headless Chromium for the report tests (tests/explain/test_report.py open the HTML reports in
# it): Debian's packages, installed as root. Without them the test skips, or fails when CI=true.
browser:
	apt-get update
	apt-get install -y chromium chromium-driver

clean-demo:
	rm -rf demo-data runs
