"""Renders the Envoy template (GATE_ENVOY_TEMPLATE; by default ``extproc/envoy.yaml``, the
one Envoy configuration, shipped in the package) with other ports and hosts, for the dev
stack, the tests, the benchmark and deploy/envoy.compose.yaml. The template stays the source
of truth."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from extproc.settings import Settings

# What reads the usage of answers handed to Envoy (gate.handoff), with the access log.
USAGE_FILTERS = ("envoy.filters.http.sse_to_metadata", "envoy.filters.http.json_to_metadata")
# Envoy's own error replies (local_reply_config), by language, in the order of its mappers.
LOCAL_REPLIES = {
    "pt-BR": ("A conversa é grande demais para o gateway. Inicie uma nova conversa.",
              "O controle de tokens está indisponível (%RESPONSE_CODE_DETAILS%). "
              "Tente novamente em instantes."),
    "en": ("The conversation is too large for the gateway. Start a new conversation.",
           "The token gate is unavailable (%RESPONSE_CODE_DETAILS%). Try again in a moment."),
}


def _endpoints(addresses: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        for host, port in addresses]}]


def render(
    *,
    listen_port: int,
    admin_port: int,
    extproc: Sequence[tuple[str, int]] | None,
    upstream: tuple[str, int],
    http: tuple[str, int],
    template: Path | None = None,
    health_check: bool = True,
    language: str = "pt-BR",
    stream_usage: bool = True,
) -> dict[str, Any]:
    """The configuration with the given ports. ``extproc=None`` removes the ext_proc filter
    (the benchmark's "Envoy direct" baseline); ``stream_usage=False`` (implied by it) removes
    what reads handed-off answers, the usage filters and the access log (the benchmark's
    no-op reference stays the one of before). ``template``: default, the package's own."""
    template = template or Settings().envoy_template_path()
    config = copy.deepcopy(yaml.safe_load(template.read_text()))
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for mapper, text in zip(hcm["local_reply_config"]["mappers"], LOCAL_REPLIES[language], strict=True):
        mapper["body_format_override"]["json_format"]["error"]["message"] = text
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    clusters["litellm"]["load_assignment"]["endpoints"] = _endpoints([upstream])
    clusters["extproc_http"]["load_assignment"]["endpoints"] = _endpoints([http])
    if extproc is None or not stream_usage:
        hcm.pop("access_log", None)
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in USAGE_FILTERS]
    if extproc is None:
        hcm["http_filters"] = [f for f in hcm["http_filters"]
                               if f["name"] != "envoy.filters.http.ext_proc"]
        for vhost in hcm["route_config"]["virtual_hosts"]:
            for route in vhost["routes"]:
                route.pop("typed_per_filter_config", None)
        config["static_resources"]["clusters"].remove(clusters["extproc"])
    else:
        clusters["extproc"]["load_assignment"]["endpoints"] = _endpoints(extproc)
        if not health_check:
            clusters["extproc"].pop("health_checks", None)
    return config


def write(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
