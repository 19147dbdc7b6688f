"""Shared test infrastructure (not tests): test modules import from here, never from each other
or from conftest (tests/test_suite_layout.py checks it).

- ``stack``: the test stack's secrets and the ``extproc serve`` child process
- ``gate``: requests through Envoy and what they left in the ledger
- ``web``: HTTP helpers for the console, /me and the admin API
- ``mail``: the one SMTP server the tests send to (aiosmtpd), and a mail-sending Service
- ``clock``: a settable clock for the ledger and the alert worker
- ``wait``: waiting for background work by its outcome, with a deadline a loaded machine meets
- ``upstream``: a fast OpenAI-compatible upstream (also run as a script by bench/run.py)
- ``stripe_api``: a local stand-in for Stripe's API and signed webhook events

conftest.py turns these into fixtures.
"""
