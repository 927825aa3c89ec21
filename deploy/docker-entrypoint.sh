#!/bin/sh
# Entry point of the container image (Dockerfile): `s2cs "$@"`, once the gateway's
# listener address is known. s2cs binds its data listeners to that address and
# advertises it to the peer facility, so it must be the host's own reachable address
# (run the container with --network host); the image cannot guess it. Give it as
# SCISTREAM_LISTENER_IP (docker run -e SCISTREAM_LISTENER_IP=192.0.2.10 ...) or as a
# --listener-ip argument; without either this refuses to start, instead of letting
# s2cs advertise 127.0.0.1. (s2cs itself refuses 0.0.0.0, :: and an empty address.)
set -eu
if [ -z "${SCISTREAM_LISTENER_IP:-}" ]; then
    for arg in "$@"; do
        case "$arg" in
        --listener-ip | --listener-ip=* | --listener_ip | --listener_ip=* | -h | --help | --version)
            exec s2cs "$@"
            ;;
        esac
    done
    echo "s2cs: SCISTREAM_LISTENER_IP is not set: set it to the address the peer facility" \
        "reaches this gateway at, e.g. docker run --network host" \
        "-e SCISTREAM_LISTENER_IP=192.0.2.10 ... (0.0.0.0 is no address a peer can connect to)" >&2
    exit 1
fi
exec s2cs "$@"
