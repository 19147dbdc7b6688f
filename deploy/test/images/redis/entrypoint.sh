#!/bin/sh
# As the official redis image's entry point: a first argument starting with '-' is an option of
# redis-server; without a config file, protected mode is off (other containers connect without
# a password: the compose network is the boundary, and the port is not published); run as redis.
set -eu
case "${1:-}" in -*) set -- redis-server "$@" ;; esac
if [ "${1:-}" = redis-server ]; then
    case "${2:-}" in
        *.conf) ;;
        *) shift; set -- redis-server --protected-mode no "$@" ;;
    esac
    if [ "$(id -u)" = 0 ]; then
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
