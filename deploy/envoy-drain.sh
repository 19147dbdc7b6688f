#!/usr/bin/env bash
# Runs Envoy (the arguments are Envoy's) and stops it gently: docker-compose.yml's command.
#
# Envoy exits at once on SIGTERM: the answers in flight are cut, and the access-log entries it
# has not flushed yet (every 0.1 s) are lost. The entries are how answers handed to Envoy
# (docs/streams.md) get settled, so each lost one leaves its reservation to the sweep, which
# charges the whole reservation GATE_RESERVATION_TTL_SECONDS later instead of the usage now.
# Every `docker compose stop`, `restart` or redeploy of Envoy would do that to the exchanges
# in flight. So on SIGTERM (or SIGINT) this script first asks Envoy's admin to drain its
# listeners (new connections are refused after --drain-time-s; every answer carries
# `Connection: close`), waits until no request is in flight (at most ENVOY_DRAIN_SECONDS, by
# the clock), waits two access-log flushes, and only then passes the SIGTERM on. Keep the
# service's stop_grace_period a few seconds above ENVOY_DRAIN_SECONDS, or the engine kills
# Envoy before.
#
# Plain bash (the Envoy image has no curl): the admin is spoken to over /dev/tcp, each answer
# read with a timeout, so an admin that does not answer cannot hold the stop.
set -u

ADMIN_PORT="${ENVOY_ADMIN_PORT:-9901}"
DRAIN_SECONDS="${ENVOY_DRAIN_SECONDS:-20}"
STAT="http.gate.downstream_rq_active"  # the gateway listener's requests in flight (stat_prefix: gate)
envoy_pid=""

admin() {  # METHOD PATH: the admin's answer on stdout (what came within 2 s of silence)
    local line
    exec 3<>"/dev/tcp/127.0.0.1/${ADMIN_PORT}" || return 1
    printf '%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n' "$1" "$2" >&3
    while IFS= read -r -t 2 line <&3 || [ -n "$line" ]; do
        printf '%s\n' "${line%$'\r'}"
        line=""
    done
    exec 3<&-
}

drain() {
    trap '' TERM INT  # one drain; a second signal changes nothing
    [ -n "$envoy_pid" ] || exit 0  # stopped before Envoy started
    echo "envoy-drain: draining before stopping (up to ${DRAIN_SECONDS} s)" >&2
    local active="" deadline=$((SECONDS + DRAIN_SECONDS))
    if admin POST "/drain_listeners?graceful" > /dev/null; then
        while ((SECONDS < deadline)); do
            active="$(admin GET "/stats?filter=downstream_rq_active" | sed -n "s/^${STAT//./\\.}: //p")"
            if [ -z "$active" ]; then
                echo "envoy-drain: no ${STAT} in the admin's answer: not waiting" >&2
                break
            fi
            [ "$active" = 0 ] && break
            sleep 0.1
        done
        sleep 0.3  # the entries of the last answers: two flushes of the access log
        echo "envoy-drain: ${active:-?} request(s) in flight at the stop" >&2
    else
        echo "envoy-drain: the admin on port ${ADMIN_PORT} did not answer: stopping at once" >&2
    fi
    kill -TERM "$envoy_pid" 2> /dev/null
    wait "$envoy_pid"
    exit $?  # Envoy's own status
}
trap drain TERM INT  # before Envoy starts: a stop at any moment drains

envoy "$@" &
envoy_pid=$!
wait "$envoy_pid"  # returns early when a signal comes: drain() then exits with Envoy's status
exit $?
