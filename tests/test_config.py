"""Configuration: one settings module, the README table in step with it, and the Envoy
configuration accepted by Envoy itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from extproc.settings import FIELDS, Settings, markdown_table
from extproc_dev import devstack, envoy_config

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_variable_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [row for row in markdown_table().splitlines() if row not in readme]
    assert missing == []


def test_design_contract_variables_exist() -> None:
    names = {name for name, _, _ in FIELDS}
    contract = {"DATABASE_URL", "REDIS_URL", "GATE_IDENTITY_MODE", "GATE_JWT_SECRET", "GATE_JWKS_URL",
                "GATE_JWT_HEADER", "GATE_KEY", "GATE_CONVERSION_FACTOR", "GATE_DEFAULT_MONTHLY_TOKENS",
                "GATE_RATE_LIMIT_PER_MINUTE", "GATE_ALERT_THRESHOLDS", "GATE_FAIL_MODE", "GATE_LANGUAGE",
                "GATE_SMTP_URL", "GATE_MAIL_FROM", "GATE_ADMIN_EMAILS", "GATE_WEBHOOK_URL",
                "GATE_WEBHOOK_SECRET", "GATE_ADMIN_TOKEN", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET",
                "STRIPE_API_BASE", "GATE_LISTEN_PORT", "GATE_GRPC_PORT", "GATE_HTTP_PORT"}
    assert contract <= names


def test_from_env_parses_types_and_defaults() -> None:
    s = Settings.from_env({"GATE_GRPC_PORT": "6000", "GATE_ENFORCE_MAX_TOKENS": "true",
                           "GATE_CONVERSION_FACTOR": "0.5", "GATE_LANGUAGE": "en", "GATE_KEY": ""})
    assert (s.grpc_port, s.enforce_max_tokens, s.conversion_factor, s.language) == (6000, True, 0.5, "en")
    assert s.rate_limit_per_minute == 100 and s.fail_mode == "closed"
    assert Settings.from_env({}).thresholds() == (80, 90, 100)
    assert Settings.from_env({"GATE_MODEL_WEIGHTS": "gpt-4o=2.5, mini=0.5"}).weights() == {
        "gpt-4o": 2.5, "mini": 0.5}


def test_weights_match_exactly_with_a_default_for_the_rest() -> None:
    from extproc.accounting import weighted_cost

    weights = Settings.from_env({"GATE_MODEL_WEIGHTS": "gpt-4o=2.5,*=4"}).weights()
    assert weighted_cost(10, "gpt-4o", weights) == 25
    assert weighted_cost(10, "GPT-4o", weights) == 40  # another spelling: the default weight
    assert weighted_cost(10, None, {}) == 10


@pytest.mark.parametrize("env,message", [
    ({"GATE_GRPC_PORT": "abc"}, "GATE_GRPC_PORT"),
    ({"GATE_IDENTITY_MODE": "magic"}, "GATE_IDENTITY_MODE"),
    ({"GATE_FAIL_MODE": "maybe"}, "GATE_FAIL_MODE"),
    ({"GATE_LANGUAGE": "fr"}, "GATE_LANGUAGE"),
    ({"GATE_CONVERSION_FACTOR": "0"}, "GATE_CONVERSION_FACTOR"),
    ({"GATE_ALERT_THRESHOLDS": "80,150"}, "GATE_ALERT_THRESHOLDS"),
    ({"GATE_MODEL_WEIGHTS": "gpt-4o=-1"}, "GATE_MODEL_WEIGHTS"),
    ({"GATE_MODEL_WEIGHTS": "gpt-4o=nan"}, "GATE_MODEL_WEIGHTS"),
    ({"GATE_MODEL_WEIGHTS": "gpt-4o=inf"}, "GATE_MODEL_WEIGHTS"),
    ({"GATE_MODEL_WEIGHTS": "gpt-4o=0"}, "GATE_MODEL_WEIGHTS"),
    ({"GATE_MODEL_WEIGHTS": "gpt-4o=lots"}, "GATE_MODEL_WEIGHTS"),
    ({"GATE_MODEL_WEIGHTS": "gpt-4o"}, "GATE_MODEL_WEIGHTS"),
    ({"GATE_SERVER_CONTEXT_TOKENS": "-1"}, "GATE_SERVER_CONTEXT_TOKENS"),
])
def test_bad_settings_are_refused_with_the_variable_named(env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize("variant", ["checked-in", "rendered", "direct"])
def test_envoy_accepts_the_configuration(variant: str, tmp_path: Path) -> None:
    if variant == "checked-in":
        path = Settings().envoy_template_path()
    else:
        config = envoy_config.render(
            listen_port=18080, admin_port=19901, upstream=("127.0.0.1", 14000),
            http=("127.0.0.1", 18081), extproc=None if variant == "direct" else [("127.0.0.1", 1), ("127.0.0.1", 2)])
        path = envoy_config.write(config, tmp_path / "envoy.yaml")
    result = subprocess.run([devstack.binary("envoy"), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr


def test_envoys_own_errors_follow_the_language() -> None:
    def messages(language: str) -> list[str]:
        config = envoy_config.render(listen_port=1, admin_port=2, upstream=("127.0.0.1", 3),
                                     http=("127.0.0.1", 4), extproc=[("127.0.0.1", 5)], language=language)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return [m["body_format_override"]["json_format"]["error"]["message"]
                for m in hcm["local_reply_config"]["mappers"]]

    assert messages("pt-BR")[1].startswith("O controle de tokens está indisponível")
    assert messages("en")[1].startswith("The token gate is unavailable")
    assert messages("en")[0].startswith("The conversation is too large")
