# RackTwin: `make up` runs the stack, `make test` runs the tests. `make help` lists the rest.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
APT_PACKAGES := mosquitto influxdb nginx fonts-inter chromium nodejs npm

.PHONY: help venv test deps-system contracts readme grafana-js

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,thingsboard,dashboards]'
	touch $@

venv: $(VENV)/.installed ## create the virtualenv with the project and its test dependencies

deps-system: ## install Mosquitto, InfluxDB, nginx, the Inter font, Chromium, Node.js and npm (and Python's venv if missing) for the tests (apt on Debian/Ubuntu)
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v influxd >/dev/null || missing="$$missing influxdb"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	[ -e /usr/share/fonts/opentype/inter/Inter-Regular.otf ] || missing="$$missing fonts-inter"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	[ -e $(VENV)/.installed ] || $(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing$$missing with apt-get"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing \
	      && for svc in mosquitto influxdb nginx; do \
	           $$SUDO service $$svc stop >/dev/null 2>&1 || true; \
	           $$SUDO systemctl disable $$svc >/dev/null 2>&1 || $$SUDO update-rc.d $$svc disable >/dev/null 2>&1 || true; \
	         done \
	      && echo "(their system services are stopped and disabled: the tests start their own, and make up needs ports 1883 and 8086)"; \
	  else \
	    echo "The tests need these programs:$$missing (Debian package names: $(APT_PACKAGES) python3-venv)."; \
	    echo "Install Mosquitto 2.x, InfluxDB 1.6+ (influxd), nginx, the Inter font (Inter-Regular.otf, Inter-Medium.otf in /usr/share/fonts/opentype/inter), Chromium, Node.js 20+ with npm and Python's venv module with your package manager, then re-run make test."; \
	    exit 1; \
	  fi; \
	fi

GRAFANA_JS := tests/grafana_js

$(GRAFANA_JS)/node_modules/.installed: $(GRAFANA_JS)/package.json $(GRAFANA_JS)/package-lock.json | deps-system
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)' || { echo "the tests need Node.js 20+ (this is $$(node --version)); Debian 12's nodejs is 18: install 20+, e.g. from nodejs.org or NodeSource"; exit 1; }
	cd $(GRAFANA_JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

grafana-js: $(GRAFANA_JS)/node_modules/.installed ## install Grafana 13.2.2's frontend packages (npm) that the tests run panels through

test: deps-system venv contracts grafana-js ## run the whole test suite (sets itself up from a fresh clone)
	$(VENV)/bin/pytest -q

readme: venv ## regenerate README's configuration reference from the settings model
	$(PY) -m bridge.readme

contracts: ## fetch the contract files the tests use into tests/contracts/ unless present (pinned, sha256-checked)
	$(PYTHON) -m tests.harness.contracts

# --- stack (compose/) ---------------------------------------------------------------------------

COMPOSE := bash compose/scripts/compose.sh
# First start pulls ~3 GB of images and installs ThingsBoard; Ditto's JVMs need 2-3 minutes to join.
WAIT_TIMEOUT ?= 1200

.PHONY: up env down clean logs ps

up: ## start the whole stack (creates compose/.env with random secrets on first run), then print the URLs
	@docker compose version >/dev/null 2>&1 || { echo "make up needs Docker Engine with the Compose v2 plugin ('docker compose' 2.24+): https://docs.docker.com/engine/install/"; exit 1; }
	@bash compose/scripts/init-env.sh
	@bash compose/scripts/preflight.sh
	$(COMPOSE) up -d --build --wait --wait-timeout $(WAIT_TIMEOUT)
	@bash compose/scripts/print-urls.sh

env: ## only create compose/.env with random secrets (or add what the example gained), e.g. to edit before the first make up
	@bash compose/scripts/init-env.sh

down: ## stop the stack (keeps all data)
	$(COMPOSE) down --remove-orphans

clean: ## stop the stack and DELETE its data volumes (asks first; CONFIRM=yes skips the question)
	@if [ "$(CONFIRM)" != yes ]; then \
	  read -r -p "Delete all RackTwin data (ThingsBoard, Ditto, InfluxDB, Grafana volumes)? Type yes: " answer; \
	  [ "$$answer" = yes ] || { echo "kept everything"; exit 1; }; \
	fi
	$(COMPOSE) down --volumes --remove-orphans

logs: ## follow the logs of all services (SERVICE=name for one)
	$(COMPOSE) logs -f --tail=200 $(SERVICE)

ps: ## list the stack's containers and their health
	$(COMPOSE) ps -a


# --- dashboards and alerts (dashboards/ -> provisioning/grafana/) ----------------------------------

.PHONY: dashboards
dashboards: venv ## regenerate dashboard JSON and alert YAML into provisioning/grafana/
	$(PY) -m dashboards.generate

# --- benchmarks -----------------------------------------------------------------------------------

.PHONY: bench
bench: venv deps-system ## run the benchmarks (loopback, prints a table, writes bench/results/latest.json)
	$(PY) -m bench.run

.PHONY: bench-queries
bench-queries: venv deps-system ## time every dashboard and alert-rule query on 1,000 racks x 24 h (bench/results/queries.json)
	$(PY) -m bench.queries

# --- forecast evaluation --------------------------------------------------------------------------

.PHONY: evaluate
evaluate: venv ## simulated-time proof of the forecast: lead time, false alerts, stuck/silent, cost -> bench/results/forecast.json
	$(PY) -m bridge.forecast.evaluate
