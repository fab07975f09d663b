# RackTwin: `make up` runs the stack, `make test` runs the tests. `make help` lists the rest.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
APT_PACKAGES := mosquitto influxdb nginx

.PHONY: help venv test deps-system contracts

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,thingsboard,dashboards]'
	touch $@

venv: $(VENV)/.installed ## create the virtualenv with the project and its test dependencies

deps-system: ## install Mosquitto, InfluxDB and nginx for the tests (apt on Debian/Ubuntu)
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v influxd >/dev/null || missing="$$missing influxdb"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing$$missing with apt-get"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing \
	      && for svc in mosquitto influxdb nginx; do $$SUDO service $$svc stop >/dev/null 2>&1 || true; done; \
	  else \
	    echo "The tests need these programs:$$missing (Debian package names: $(APT_PACKAGES))."; \
	    echo "Install Mosquitto 2.x, InfluxDB 1.6+ (influxd) and nginx with your package manager, then re-run make test."; \
	    exit 1; \
	  fi; \
	fi

test: venv deps-system ## run the whole test suite (sets itself up from a fresh clone)
	$(VENV)/bin/pytest -q

contracts: ## download the contract files the tests use into tests/contracts/ (pinned commits, sha256-checked)
	$(PY) -m tests.harness.contracts

# --- stack (compose/) ---------------------------------------------------------------------------

# --- dashboards and alerts (dashboards/ -> provisioning/grafana/) ----------------------------------

# --- benchmarks -----------------------------------------------------------------------------------
