"""The one place where configuration lives.

Every knob is an environment variable with a documented default. The README's
configuration table is printed by ``python -m extproc.settings`` and a test checks that
the README lists every variable with its default, so the two never drift.
Code receives a ``Settings`` object explicitly; nothing else in the package reads
``os.environ`` (the dev stack, ``extproc_dev``, hands its environment to the processes it
starts).

Files the package ships (the dbmate migrations, the Envoy template) are package data, found
beside this module unless a variable points elsewhere: never through a source checkout.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The installed package's own directory: its data files (migrations/, envoy.yaml) sit beside
# its modules, in a wheel as in an editable install. (``extproc`` is a namespace package, which
# ``importlib.resources.files`` cannot open under setuptools' editable finder.)
PACKAGE = Path(__file__).resolve().parent

# (env var, attribute, meaning); the default is the dataclass field's default below.
FIELDS: list[tuple[str, str, str]] = [
    ("DATABASE_URL", "database_url",
     "PostgreSQL DSN of the ledger database (its own database)."),
    ("GATE_DB_POOL_SIZE", "db_pool_size",
     "Connections per pool and process (two pools: settles/admin, and admissions)."),
    ("REDIS_URL", "redis_url",
     "Redis for rate limits and caches; never the only copy of money."),
    ("GATE_LISTEN_PORT", "listen_port", "Envoy listener port (LibreChat points here)."),
    ("GATE_GRPC_PORT", "grpc_port", "Processor gRPC (ext_proc) port."),
    ("GATE_HTTP_PORT", "http_port",
     "Processor HTTP port: /metrics, /healthz, /readyz, /admin, /me, /api."),
    ("GATE_UPSTREAM_PORT", "upstream_port", "LiteLLM port (the upstream Envoy routes to)."),
    ("GATE_ENVOY_ADMIN_PORT", "envoy_admin_port", "Envoy admin port."),
    ("GATE_IDENTITY_MODE", "identity_mode", "`jwt`, `trusted-headers` or `both` (JWT first)."),
    ("GATE_JWT_SECRET", "jwt_secret", "HS256 secret (e.g. LibreChat's JWT_SECRET)."),
    ("GATE_JWKS_URL", "jwks_url", "JWKS URL for RS256/ES256 tokens (e.g. an OpenID provider)."),
    ("GATE_JWT_HEADER", "jwt_header",
     "Header carrying the JWT (a `Bearer ` prefix is stripped)."),
    ("GATE_JWT_AUDIENCE", "jwt_audience",
     "Required `aud` claim, when set; must be set when `GATE_JWKS_URL` is."),
    ("GATE_JWT_ISSUER", "jwt_issuer", "Required `iss` claim, when set."),
    ("GATE_ADMIN_CLAIM", "admin_claim",
     "JWT claim that makes a console admin (e.g. `role`, or a path like `realm_access.roles`); "
     "empty: no claim does."),
    ("GATE_ADMIN_CLAIM_VALUE", "admin_claim_value",
     "Exact value of `GATE_ADMIN_CLAIM` (or an element of it, for a list) that makes an admin."),
    ("GATE_ADMIN_USERS", "admin_users",
     "Comma-separated user ids (JWT `id`/`sub`) who are console admins."),
    ("GATE_KEY", "gate_key",
     "Gateway key LibreChat sends as its apiKey; proves the trusted identity headers."),
    ("GATE_UPSTREAM_API_KEY", "upstream_api_key",
     "Key sent to LiteLLM as `Authorization` (its master or a virtual key); the client's own "
     "credentials never reach the upstream."),
    ("GATE_CONVERSION_FACTOR", "conversion_factor",
     "Estimated tokens per prompt character (the seed's measured factor)."),
    ("GATE_DEFAULT_COMPLETION_TOKENS", "default_completion_tokens",
     "Completion allowance reserved when a request carries no max_tokens."),
    ("GATE_ENFORCE_MAX_TOKENS", "enforce_max_tokens",
     "Write the completion allowance into requests without max_tokens."),
    ("GATE_MAX_COMPLETION_TOKENS", "max_completion_tokens",
     "Largest max_tokens accepted in a request (400 above it)."),
    ("GATE_DEFAULT_MONTHLY_TOKENS", "default_monthly_tokens",
     "Monthly allowance of the default plan (new accounts get it on first request)."),
    ("GATE_MODEL_WEIGHTS", "model_weights",
     "Optional per-model weights, `model=weight,...`, matched exactly (`*=w`: every other "
     "model); reservations and debits are tokens x weight. Positive and finite, or no start."),
    ("GATE_MAX_USAGE_TOKENS", "max_usage_tokens",
     "A reported usage above this is capped and flagged (garbled upstream)."),
    ("GATE_RESERVATION_TTL_SECONDS", "reservation_ttl_seconds",
     "A reservation not settled by then is swept (charged its estimate, flagged)."),
    ("GATE_SWEEP_INTERVAL_SECONDS", "sweep_interval_seconds",
     "How often `serve` sweeps expired reservations and idle cycles."),
    ("GATE_MAX_BODY_BYTES", "max_body_bytes",
     "Largest request body accepted (413 above it)."),
    ("GATE_RATE_LIMIT_PER_MINUTE", "rate_limit_per_minute",
     "Requests per user per minute (default; plans may override)."),
    ("GATE_RATE_LIMIT_LEASE", "rate_limit_lease",
     "Requests a processor may take at once (one Redis call) from a user's per-minute limit and "
     "count in memory for up to 1 s: only while the user has more than half of the limit left, "
     "at most 1/20 of it, and growing from 1 only for users who spend each lease in time. N "
     "processes let at most N x this many requests past a limit; 0: one Redis call per request."),
    ("GATE_ALERT_THRESHOLDS", "alert_thresholds", "Usage % that trigger alerts."),
    ("GATE_FAIL_MODE", "fail_mode",
     "Ledger unreachable at admission: `closed` (503) or `open` (admit, settle later)."),
    ("GATE_SPOOL_DIR", "spool_dir",
     "Directory of the durable settle spool (used when the ledger is unreachable)."),
    ("GATE_LANGUAGE", "language", "`pt-BR` or `en`: messages shown to users."),
    ("GATE_SMTP_URL", "smtp_url", "`smtp://` or `smtps://user:pass@host:port` for alerts."),
    ("GATE_MAIL_FROM", "mail_from", "Sender of alert e-mails."),
    ("GATE_ADMIN_EMAILS", "admin_emails", "Comma-separated admins who get 100 % alerts."),
    ("GATE_WEBHOOK_URL", "webhook_url", "Optional alert webhook (JSON, HMAC-signed)."),
    ("GATE_WEBHOOK_SECRET", "webhook_secret", "HMAC-SHA256 secret for the webhook."),
    ("GATE_ADMIN_TOKEN", "admin_token", "Admin API token (Bearer) for /api/admin."),
    ("GATE_PUBLIC_URL", "public_url",
     "Public base URL, used in links (e-mails, 402 messages)."),
    ("GATE_OPEN_PATHS", "open_paths",
     "Extra path prefixes passed through unmetered (explicit opt-in; e.g. `/v1/audio`)."),
    ("GATE_LOG_LEVEL", "log_level", "Python log level."),
    ("GATE_EVENT_LOOP", "event_loop",
     "Event loop of `extproc serve`: `uvloop` (libuv's: lower latency at low and moderate load; "
     "asyncio's, with a warning in the log, when uvloop is not installed) or `asyncio` (the "
     "standard library's: 5-8 % more requests per core at saturation)."),
    ("GATE_STREAM_USAGE", "stream_usage",
     "Who reads a streamed Chat Completions or Completions answer's usage: `envoy` (Envoy's "
     "sse_to_metadata filter; the chunks pass without waiting on the processor, which settles "
     "from Envoy's access log; only for answers whose length the request bounds, docs/streams.md) "
     "or `processor` (every chunk through the processor, as for every other stream)."),
    ("GATE_JSON_USAGE", "json_usage",
     "Who reads a JSON (not streamed) Chat Completions or Completions answer's usage: `envoy` "
     "(Envoy's json_to_metadata filter; the body passes without a message to the processor, "
     "which settles from Envoy's access log; only for answers whose length the request bounds; "
     "such answers carry no `x-solaris-tokens-remaining`, docs/streams.md) or `processor` (the "
     "body through the processor, with the remaining-tokens headers)."),
    ("STRIPE_SECRET_KEY", "stripe_secret_key", "Stripe API key; billing is on only when both Stripe keys are set."),
    ("STRIPE_WEBHOOK_SECRET", "stripe_webhook_secret", "Stripe webhook signing secret."),
    ("STRIPE_API_BASE", "stripe_api_base", "Override of Stripe's API base URL (tests)."),
    ("GATE_CREDIT_PACKS", "credit_packs",
     "Credit packs sold with Stripe, `id:tokens:price-in-cents:currency,...` (shown only when both "
     "Stripe keys are set)."),
    ("GATE_SERVER_CONTEXT_TOKENS", "server_context_tokens",
     "Tokens reserved for context the upstream holds and the gate cannot see "
     "(`previous_response_id`, `conversation`, file ids, stored prompts), each."),
    ("GATE_ALLOWED_MODELS", "allowed_models",
     "Optional comma-separated allow-list of models; other models get a 400 (empty: any)."),
    ("GATE_EXTRA_BODY_FIELDS", "extra_body_fields",
     "Comma-separated top-level request fields accepted beyond each API schema's own (a "
     "provider's parameter the company uses); their text is billed as prompt. Any other "
     "unknown field gets a 400, and fields that change how the proxy calls the model (model "
     "lists, credentials, retries, dropped parameters) cannot be added."),
    ("GATE_INLINE_NOTICES", "inline_notices",
     "Show the 80 % and 90 % notices inside the chat (one short `[Solaris]` line appended to a "
     "plain-text answer, once per threshold and cycle); off by default."),
    ("GATE_SIGNIN_ATTEMPTS_PER_ADDRESS", "signin_attempts_per_address",
     "Sign-in attempts (admin password, /me link requests) per client address per 15 minutes; "
     "429 above it."),
    ("GATE_SIGNIN_ATTEMPTS_PER_ACCOUNT", "signin_attempts_per_account",
     "Sign-in attempts per admin name or e-mail address per 15 minutes; 429 above it."),
    ("TIKTOKEN_CACHE_DIR", "tiktoken_cache_dir",
     "tiktoken's encodings directory, so nothing is downloaded (empty: the files the LiteLLM "
     "wheel ships, when installed, else tiktoken's own download; counted by characters when "
     "the encoding cannot be loaded)."),
    ("GATE_MIGRATIONS_DIR", "migrations_dir",
     "Directory of the dbmate migrations (empty: the ones shipped in the package, "
     "`extproc/migrations`)."),
    ("GATE_ENVOY_TEMPLATE", "envoy_template",
     "Envoy configuration `extproc dev` renders with its ports (empty: the one shipped in the "
     "package, `extproc/envoy.yaml`, which the tests and deploy/envoy.compose.yaml use)."),
]

_BOOL_TRUE = {"1", "true", "yes", "on"}


def _parse(default: Any, raw: str) -> Any:
    if isinstance(default, bool):
        return raw.strip().lower() in _BOOL_TRUE
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


@dataclass(frozen=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/solaris"
    db_pool_size: int = 10
    redis_url: str = "redis://127.0.0.1:6379/0"
    listen_port: int = 8080
    grpc_port: int = 50051
    http_port: int = 8081
    upstream_port: int = 4000
    envoy_admin_port: int = 9901
    identity_mode: str = "both"
    jwt_secret: str = ""
    jwks_url: str = ""
    jwt_header: str = "authorization"
    jwt_audience: str = ""
    jwt_issuer: str = ""
    admin_claim: str = ""
    admin_claim_value: str = ""
    admin_users: str = ""
    gate_key: str = ""
    upstream_api_key: str = ""
    conversion_factor: float = 0.376
    default_completion_tokens: int = 1024
    enforce_max_tokens: bool = False
    max_completion_tokens: int = 131072
    default_monthly_tokens: int = 1_000_000
    model_weights: str = ""
    max_usage_tokens: int = 10_000_000
    reservation_ttl_seconds: int = 900
    sweep_interval_seconds: int = 30
    max_body_bytes: int = 8 * 1024 * 1024
    rate_limit_per_minute: int = 100
    rate_limit_lease: int = 16
    alert_thresholds: str = "80,90,100"
    fail_mode: str = "closed"
    spool_dir: str = "spool"
    language: str = "pt-BR"
    smtp_url: str = ""
    mail_from: str = "solaris@localhost"
    admin_emails: str = ""
    webhook_url: str = ""
    webhook_secret: str = ""
    admin_token: str = ""
    public_url: str = "http://localhost:8080"
    open_paths: str = ""
    log_level: str = "INFO"
    event_loop: str = "uvloop"
    stream_usage: str = "envoy"
    json_usage: str = "envoy"
    stripe_secret_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""
    credit_packs: str = "small:100000:2990:brl,medium:500000:12990:brl"
    server_context_tokens: int = 32768
    allowed_models: str = ""
    extra_body_fields: str = ""
    inline_notices: bool = False
    signin_attempts_per_address: int = 20
    signin_attempts_per_account: int = 5
    # Not an env var: a key prefix so test runs sharing one Redis never collide.
    redis_prefix: str = field(default="solaris:")
    tiktoken_cache_dir: str = ""
    migrations_dir: str = ""
    envoy_template: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()
        values: dict[str, Any] = {}
        for name, attr, _meaning in FIELDS:
            if name in env and env[name] != "":
                try:
                    values[attr] = _parse(getattr(defaults, attr), env[name])
                except ValueError as exc:
                    raise ValueError(f"{name}={env[name]!r}: {exc}") from None
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.identity_mode not in ("jwt", "trusted-headers", "both"):
            raise ValueError("GATE_IDENTITY_MODE must be jwt, trusted-headers or both")
        if self.fail_mode not in ("closed", "open"):
            raise ValueError("GATE_FAIL_MODE must be closed or open")
        if self.language not in ("pt-BR", "en"):
            raise ValueError("GATE_LANGUAGE must be pt-BR or en")
        if self.rate_limit_lease < 0:
            raise ValueError("GATE_RATE_LIMIT_LEASE must be >= 0")
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ValueError("GATE_EVENT_LOOP must be uvloop or asyncio")
        if self.stream_usage not in ("envoy", "processor"):
            raise ValueError("GATE_STREAM_USAGE must be envoy or processor")
        if self.json_usage not in ("envoy", "processor"):
            raise ValueError("GATE_JSON_USAGE must be envoy or processor")
        if not 0 < self.conversion_factor <= 10:
            raise ValueError("GATE_CONVERSION_FACTOR must be in (0, 10]")
        if self.jwks_url and not self.jwt_audience:
            # A shared identity provider signs tokens for other applications too: without an
            # audience, those tokens (and their admins) would be ours.
            raise ValueError("GATE_JWT_AUDIENCE is required when GATE_JWKS_URL is set (the audience "
                             "your identity provider puts in this gate's tokens)")
        if bool(self.admin_claim.strip()) != bool(self.admin_claim_value):
            raise ValueError("GATE_ADMIN_CLAIM and GATE_ADMIN_CLAIM_VALUE must be set together")
        if self.server_context_tokens < 0:
            raise ValueError("GATE_SERVER_CONTEXT_TOKENS must be >= 0")
        self.thresholds()  # parses or raises
        self.weights()

    def thresholds(self) -> tuple[int, ...]:
        values = sorted({int(p) for p in self.alert_thresholds.split(",") if p.strip()})
        if any(not 0 < v <= 100 for v in values):
            raise ValueError("GATE_ALERT_THRESHOLDS must be percentages in (0, 100]")
        return tuple(values)

    def weights(self) -> dict[str, float]:
        """Model name (matched exactly, as the client sends it) -> weight. A weight must be a
        positive finite number: a negative or NaN weight would turn debits into credits or
        break every settle, so a bad value refuses to start."""
        out: dict[str, float] = {}
        for item in self.model_weights.split(","):
            if item.strip():
                model, sep, text = item.partition("=")
                try:
                    weight = float(text)
                except ValueError:
                    weight = math.nan
                if not sep or not model.strip() or not math.isfinite(weight) or weight <= 0:
                    raise ValueError(f"GATE_MODEL_WEIGHTS: {item.strip()!r} is not model=weight "
                                     "with a positive finite weight")
                out[model.strip()] = weight
        return out

    def extra_body_field_set(self) -> frozenset[str]:
        return frozenset(f.strip() for f in self.extra_body_fields.split(",") if f.strip())

    def allowed_model_set(self) -> frozenset[str]:
        return frozenset(m.strip() for m in self.allowed_models.split(",") if m.strip())

    def admin_email_list(self) -> list[str]:
        return [e.strip() for e in self.admin_emails.split(",") if e.strip()]

    def open_path_list(self) -> list[str]:
        return [p.strip() for p in self.open_paths.split(",") if p.strip()]

    def migrations_path(self) -> Path:
        """GATE_MIGRATIONS_DIR, else the migrations shipped in the package."""
        return Path(self.migrations_dir) if self.migrations_dir else PACKAGE / "migrations"

    def envoy_template_path(self) -> Path:
        """GATE_ENVOY_TEMPLATE, else the Envoy configuration shipped in the package."""
        return Path(self.envoy_template) if self.envoy_template else PACKAGE / "envoy.yaml"


def markdown_table() -> str:
    """The README's configuration table."""
    defaults = Settings()
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, attr, meaning in FIELDS:
        value = getattr(defaults, attr)
        if isinstance(value, bool):
            value = str(value).lower()
        rows.append(f"| `{name}` | {f'`{value}`' if value != '' else '(empty)'} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
