#!/usr/bin/env bash
# docker compose with RackTwin's env file, compose files and profiles for the TB_MODE in compose/.env.
# Usage: compose/scripts/compose.sh <docker compose arguments...>
set -euo pipefail

compose_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_file=$compose_dir/.env

if ! docker compose version >/dev/null 2>&1; then
    echo "RackTwin needs Docker Engine with the Compose v2 plugin ('docker compose', 2.24 or newer)." >&2
    echo "Install it from https://docs.docker.com/engine/install/ and check with: docker compose version" >&2
    exit 1
fi
if [ ! -f "$env_file" ]; then
    echo "compose/.env is missing: run 'make up' (it creates the file with random secrets)." >&2
    exit 1
fi

mode=$(sed -n 's/^TB_MODE=//p' "$env_file" | tail -n 1)
files=(-f "$compose_dir/docker-compose.yml")
case "${mode:-demo}" in
    demo)
        export COMPOSE_PROFILES=demo
        ;;
    external)
        export COMPOSE_PROFILES=
        files+=(-f "$compose_dir/docker-compose.external.yml")
        ;;
    *)
        echo "compose/.env: TB_MODE must be 'demo' or 'external', not '$mode'" >&2
        exit 1
        ;;
esac

exec docker compose --project-directory "$compose_dir" --env-file "$env_file" "${files[@]}" "$@"
