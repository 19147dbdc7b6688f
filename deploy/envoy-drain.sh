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
# `Connection: close`), waits until no request is in flight (at most ENVOY_DRAIN_SECONDS),
# waits two access-log flushes, and only then passes the SIGTERM on. Keep the service's
# stop_grace_period above ENVOY_DRAIN_SECONDS, or the engine kills Envoy before.
#
# Plain bash (the Envoy image has no curl): the admin is spoken to over /dev/tcp.
set -u

ADMIN_PORT="${ENVOY_ADMIN_PORT:-9901}"
DRAIN_SECONDS="${ENVOY_DRAIN_SECONDS:-25}"
STAT="http.gate.downstream_rq_active"  # the gateway listener's requests in flight (stat_prefix: gate)

admin() {  # METHOD PATH: the admin's answer on stdout
    exec 3<>"/dev/tcp/127.0.0.1/${ADMIN_PORT}" || return 1
    printf '%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n' "$1" "$2" >&3
    cat <&3
    exec 3<&-
}

in_flight() {  # the number of requests in flight, or nothing when the admin does not answer
    admin GET "/stats?filter=downstream_rq_active" | tr -d '\r' | sed -n "s/^${STAT//./\\.}: //p"
}

envoy "$@" &
envoy_pid=$!

drain() {
    trap '' TERM INT  # one drain; a second signal changes nothing
    echo "envoy-drain: draining before stopping (up to ${DRAIN_SECONDS} s)" >&2
    if admin POST "/drain_listeners?graceful" > /dev/null; then
        for ((tick = 0; tick < DRAIN_SECONDS * 10; tick++)); do
            active="$(in_flight)"
            [ -z "$active" ] || [ "$active" = 0 ] && break
            sleep 0.1
        done
        sleep 0.3  # the entries of the last answers: two flushes of the access log
        echo "envoy-drain: ${active:-?} request(s) in flight at the stop" >&2
    fi
    kill -TERM "$envoy_pid" 2> /dev/null
}
trap drain TERM INT

# `wait` returns early when a trapped signal arrives: wait again until Envoy itself has exited.
status=0
while kill -0 "$envoy_pid" 2> /dev/null; do
    wait "$envoy_pid"
    status=$?
done
exit "$status"
