#!/bin/sh
# Entrypoint of the hub image: `serve` (the default) initialises the data directory on first
# start, then serves; any other arguments run `gantry-hub` with them (e.g. `token create`).
set -eu

data="${GANTRY_DATA:-/var/lib/gantry-hub}"
config="${GANTRY_CONFIG:-/etc/gantry/hub.toml}"

if [ "${1:-serve}" != "serve" ]; then
    exec /usr/local/bin/gantry-hub "$@"
fi
shift || true

if [ ! -d "$data/pki" ]; then
    if [ -z "${GANTRY_PUBLIC_ADDR:-}" ]; then
        echo "error: $data is not initialised and GANTRY_PUBLIC_ADDR is not set;" >&2
        echo "  set it to the HOST:PORT agents dial (the published QUIC UDP port), e.g. hub.example.com:7443" >&2
        exit 2
    fi
    # Prints the admin login and, without GANTRY_ADMIN_PASSWORD, a generated password (once).
    /usr/local/bin/gantry-hub init --data "$data" --public-addr "$GANTRY_PUBLIC_ADDR"
fi

if [ -f "$config" ]; then
    exec /usr/local/bin/gantry-hub serve --config "$config" --data "$data" "$@"
fi
exec /usr/local/bin/gantry-hub serve --data "$data" "$@"
