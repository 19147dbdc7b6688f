# The two commands: `make run` (the whole stack, embedded) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench install tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/extproc dev

# System tools some tests drive: Debian's chromium (browser tests), docker-compose (validates
# docker-compose.yml without an engine) and promtool (Prometheus rules). Installed when
# missing and apt is usable (CI runs as root); otherwise those tests skip and say why.
DEBIAN_TOOLS := chromium:chromium docker-compose:docker-compose promtool:prometheus
tools:
	@missing=""; for pair in $(DEBIAN_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; the tests that need them will skip"; \
	  else echo "warning: missing$$missing (not root or no apt); the tests that need them will skip"; fi; \
	fi

test: $(STAMP) tools
	$(VENV)/bin/ruff check extproc tests bench
	$(VENV)/bin/pytest -p no:cacheprovider --cov=extproc --cov-report=term --cov-fail-under=85 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check extproc tests bench

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .devstack .coverage .coverage.* spool
