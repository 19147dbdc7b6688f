"""The processor's HTTP side (port 8081), in layers; a module imports only those below it:

- ``app``: builds the aiohttp application (middleware, health, readiness, metrics) and
  mounts the three surfaces;
- ``admin`` (the console, /admin and /api/admin), ``me`` (the user's statement, usage,
  settings and data, /me and /api/me), ``billing`` (the credit purchase routes): handlers
  only, never importing one another;
- ``usage``: where a user's tokens went (per day and model), the view /me and the admin's
  user page share;
- ``kit``: what those share (typed service, context and the reader's language, errors, CSRF,
  parsing, JSON/CSV);
- ``sessions`` (cookies, CSRF tokens, magic links, admin credentials) and ``queries`` (the
  read-only SQL of the pages).

Money never moves here: changes go through ``extproc.ledger``, purchases through
``extproc.purchases``."""

from .app import build_app

__all__ = ["build_app"]
