#!/bin/sh
# docker-entrypoint.sh: the fm-edge container's entry point (tools/deploy/Dockerfile).
#
#   docker run -d --name flowmason-edge -p 8080:8080 \
#     -v /var/flowmason:/var/flowmason \
#     -e CLOUD_URL=https://studio.flowmason.io -e API_KEY=your-api-key \
#     flowmason/edge:latest
#
# What it does, in order:
#
# 1. Maps the variable names the FlowMason docs use for the image onto fm-edge's own:
#      CLOUD_URL -> FLOWMASON_CLOUD_URL, API_KEY -> FLOWMASON_API_KEY,
#      API_TOKEN -> FLOWMASON_EDGE_API_TOKEN.
#    A FLOWMASON_* variable that is already set wins (a warning says so when they differ).
#    API_KEY and API_TOKEN are then removed from the environment, so each secret is known
#    under one name only (pipelines never see either: see env_allowlist in the README).
# 2. Sets FLOWMASON_EDGE_DATA_DIR=/var/flowmason/edge unless it is already set, so
#    everything fm-edge keeps (pipelines, models, results, config.json, logs) lives in the
#    /var/flowmason volume.
# 3. Runs fm-edge. With no arguments, or with `serve ...`, it serves the HTTP API in the
#    foreground on all interfaces of the container (the host decides what is published
#    with -p); any other arguments are an fm-edge command run once, e.g.
#      docker run --rm -v /var/flowmason:/var/flowmason IMAGE status
#      docker run --rm -v /var/flowmason:/var/flowmason IMAGE sync --json
#    The command is exec'ed: fm-edge is PID 1 of the container and receives `docker stop`'s
#    SIGTERM itself (it finishes or interrupts runs within its grace period, then exits 0).
#
# The API token (decision): fm-edge refuses to serve a non-loopback address without an
# api_token (shared/reliability.md §3.1), and a container must bind a non-loopback
# address to be reachable. When no token is configured (FLOWMASON_EDGE_API_TOKEN,
# API_TOKEN, or api_token in DATA_DIR/config.json), this script GENERATES one
# (32 random bytes, URL-safe), saves it with `fm-edge config set api_token` in
# DATA_DIR/config.json (mode 0600, inside the volume, so it survives restarts and
# upgrades) and prints where it is and how to read it - never the token itself. The
# documented `docker run` line then works unchanged and the API is still never open to
# anyone without the token. Set FM_EDGE_GENERATE_TOKEN=0 to refuse to start instead.
# (While `config set` runs, the new token is on its command line for a moment; only
# processes inside this container could see it.)
#
# Clients send `Authorization: Bearer <token>`; GET /health needs no token (the image's
# HEALTHCHECK uses it). Read the token with:
#   docker exec flowmason-edge fm-edge config get api_token --reveal
#
# Variables only this script reads (tests use the first two to run it outside a container):
#   FM_EDGE_PYZ             the fm-edge.pyz to run (default /opt/fm-edge/fm-edge.pyz)
#   FM_EDGE_PYTHON          the Python to run it with (default python3)
#   FM_EDGE_GENERATE_TOKEN  1 (default): generate a missing api_token; 0: refuse to start
# The bind address is FLOWMASON_EDGE_HOST (default here 0.0.0.0), the port
# FLOWMASON_EDGE_PORT (default 8080; the HEALTHCHECK reads the same variable). Set both
# through the environment, not config.json: the HEALTHCHECK and `-p` must agree with them.
#
# Exit codes: fm-edge's own (README "Exit codes"); 2 when this script refuses to start
# (data dir not writable, no token and FM_EDGE_GENERATE_TOKEN=0, configuration unreadable).

set -eu

PYTHON="${FM_EDGE_PYTHON:-python3}"
PYZ="${FM_EDGE_PYZ:-/opt/fm-edge/fm-edge.pyz}"

say() {
    printf 'fm-edge-entrypoint: %s\n' "$*" >&2
}

die() {
    say "error: $*"
    exit 2
}

# fm-edge in isolated mode (-I): nothing from PYTHONPATH or site-packages leaks in.
fm_edge() {
    "$PYTHON" -I "$PYZ" "$@"
}

# map_env SEED_NAME FM_EDGE_NAME: copy the seed's variable unless fm-edge's is already set.
map_env() {
    eval "seed_value=\${$1:-}"
    eval "own_value=\${$2:-}"
    if [ -z "$seed_value" ]; then
        return 0
    fi
    if [ -z "$own_value" ]; then
        export "$2=$seed_value"
    elif [ "$own_value" != "$seed_value" ]; then
        say "warning: both $1 and $2 are set and differ; using $2"
    fi
}

map_env CLOUD_URL FLOWMASON_CLOUD_URL
map_env API_KEY FLOWMASON_API_KEY
map_env API_TOKEN FLOWMASON_EDGE_API_TOKEN
unset API_KEY API_TOKEN seed_value own_value

export FLOWMASON_EDGE_DATA_DIR="${FLOWMASON_EDGE_DATA_DIR:-/var/flowmason/edge}"

if [ ! -f "$PYZ" ]; then
    die "$PYZ does not exist: the image is incomplete (set FM_EDGE_PYZ to the fm-edge.pyz to run)"
fi

if [ "$#" -eq 0 ]; then
    set -- serve
fi

if [ "$1" != serve ]; then
    exec "$PYTHON" -I "$PYZ" "$@"
fi
shift

data="$FLOWMASON_EDGE_DATA_DIR"
mkdir -p "$data" 2>/dev/null || true
if [ ! -d "$data" ] || [ ! -w "$data" ]; then
    die "the data dir $data is not writable by uid $(id -u) gid $(id -g). On the host, \
give the directory mounted at /var/flowmason to that user (e.g. \
\`chown -R $(id -u):$(id -g) /var/flowmason\`), or run the container with \
--user set to the directory's owner."
fi

# The token: from the environment or config.json, else generated (see the header).
if ! current=$(fm_edge config get api_token); then
    die "cannot read fm-edge's configuration in $data (the error is above); fix or \
remove $data/config.json"
fi
if [ -z "$current" ]; then
    if [ "${FM_EDGE_GENERATE_TOKEN:-1}" = 0 ]; then
        die "no api_token is set and the API must listen on a non-loopback address in \
a container: pass one with -e API_TOKEN=... (or FLOWMASON_EDGE_API_TOKEN), or save one \
with \`fm-edge config set api_token TOKEN\` in $data, or drop FM_EDGE_GENERATE_TOKEN=0 \
to let this script generate one"
    fi
    token=$("$PYTHON" -I -c 'import secrets; print(secrets.token_urlsafe(32))')
    fm_edge config set api_token "$token" >/dev/null
    unset token
    say "no api_token was given: generated one and saved it in $data/config.json \
(mode 0600). Clients must send 'Authorization: Bearer <token>'. Read it with: \
docker exec <container> fm-edge config get api_token --reveal"
fi
unset current

exec "$PYTHON" -I "$PYZ" serve --host "${FLOWMASON_EDGE_HOST:-0.0.0.0}" "$@"
