"""The processor's HTTP side (port 8081): health, readiness and metrics, the admin console,
the user's statement page (/me) and the Stripe purchase routes."""

from .app import build_app

__all__ = ["build_app"]
