#!/bin/bash
# Docker HEALTHCHECK of the hub image: healthy while `GET /readyz` answers 200 (the store
# answers and the QUIC listener accepts agents). Uses curl when the image has it (also for a
# hub serving HTTPS itself, GANTRY_TLS), else bash's /dev/tcp for plain HTTP.
set -u

port="${GANTRY_HTTP_ADDR:-0.0.0.0:8080}"
port="${port##*:}"
if command -v curl >/dev/null 2>&1; then
    scheme=http
    if [ -n "${GANTRY_TLS:-}" ] && [ "${GANTRY_TLS}" != off ] || [ -n "${GANTRY_TLS_CERT:-}" ]; then
        scheme=https
    fi
    exec curl --fail --silent --show-error --insecure --max-time 4 --output /dev/null "$scheme://127.0.0.1:$port/readyz"
fi
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
read -r -t 4 _ status _ <&3 || exit 1
[ "$status" = 200 ]
