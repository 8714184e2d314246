#!/bin/sh
# Entrypoint of the agent image: `run` (the default) enrolls on first start with GANTRY_TOKEN,
# then connects; any other arguments run `gantry-agent` with them (e.g. `--version`).
set -eu

state="${GANTRY_STATE_DIR:-/var/lib/gantry-agent}"
config="${GANTRY_CONFIG:-/etc/gantry/agent.toml}"

if [ "${1:-run}" != "run" ]; then
    exec /usr/local/bin/gantry-agent "$@"
fi
shift || true

if [ ! -f "$state/identity.json" ]; then
    if [ -z "${GANTRY_TOKEN:-}" ]; then
        echo "error: $state holds no enrolled identity and GANTRY_TOKEN is not set;" >&2
        echo "  create a token in the hub (Enrollment tokens) and pass it as GANTRY_TOKEN" >&2
        exit 2
    fi
    set --
    for label in ${GANTRY_LABELS:-}; do
        set -- "$@" --label "$label"
    done
    /usr/local/bin/gantry-agent enroll --state-dir "$state" "$@"
fi

if [ -f "$config" ]; then
    exec /usr/local/bin/gantry-agent run --config "$config" --state-dir "$state"
fi
exec /usr/local/bin/gantry-agent run --state-dir "$state"
