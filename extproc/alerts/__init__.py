"""Threshold alerts (e-mail and webhook), delivered from the ledger's outbox.

- ``worker``: the outbox worker (plan, claim, send, record; retries and leases) and the
  ``extproc worker`` entry point; the rules are in its docstring;
- ``render``: what an alert says (e-mails, the webhook payload), in the gate's language;
- ``webhook``: signing and posting the payload.

E-mail goes through ``extproc.mail``, shared with /me's sign-in links.
"""

from .worker import AlertWorker, worker_main

__all__ = ["AlertWorker", "worker_main"]
