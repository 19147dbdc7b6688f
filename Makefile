# The two commands: `make run` (the whole stack, embedded) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: run test test-compose lint bench install tools js clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/extproc dev

# System tools some tests drive: Debian's chromium (browser tests), docker-compose (validates
# docker-compose.yml, and runs it in tests/test_compose.py), promtool (Prometheus rules), and
# rootful Podman with runc and debootstrap (tests/test_compose.py builds and runs the images;
# podman only recommends netavark, aardvark-dns and iptables, without which no container has a
# network; docker-compose runs `exec`/`run` through a `docker` CLI: podman-docker's). Installed
# when missing and apt is usable (CI runs as root); otherwise those tests skip and say why.
DEBIAN_TOOLS := chromium:chromium docker-compose:docker-compose promtool:prometheus \
                podman:podman podman:netavark podman:aardvark-dns podman:iptables runc:runc \
                debootstrap:debootstrap docker:podman-docker
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

# Test-only JavaScript (package.json, pinned by package-lock.json): axe-core, which
# tests/test_accessibility.py injects into Chromium, and the OpenAI Node SDK, which
# tests/test_integrity.py drives against the gate. Without npm the step warns and those tests
# skip, saying why; the stamp is then not written, so the next run tries again.
$(NODE_STAMP): package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --no-audit --no-fund --loglevel=error && touch $(NODE_STAMP); \
	else echo "warning: npm is missing; the accessibility and Node SDK tests will skip (install Node.js and npm)"; fi

js: $(NODE_STAMP)

test: $(STAMP) tools $(NODE_STAMP)
	$(VENV)/bin/ruff check extproc extproc_dev tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -p no:cacheprovider --cov=extproc --cov-report=term --cov-fail-under=85 tests

# The container deployment alone: builds every image and runs docker-compose.yml (~2 min with
# the images cached, ~6 min cold). `make test` runs it too.
test-compose: $(STAMP) tools
	$(VENV)/bin/pytest -p no:cacheprovider tests/test_compose.py tests/test_deploy.py

lint: $(STAMP)
	$(VENV)/bin/ruff check extproc extproc_dev tests bench
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .devstack .coverage .coverage.* spool node_modules
