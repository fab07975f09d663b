#!/usr/bin/env bash
# docker compose with RackTwin's env file, compose files and profiles for the TB_MODE in compose/.env.
# Usage: compose/scripts/compose.sh <docker compose arguments...>
set -euo pipefail

compose_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib.sh
source "$compose_dir/scripts/lib.sh"
env_file=$compose_dir/.env

if ! docker compose version >/dev/null 2>&1; then
    echo "RackTwin needs Docker Engine with the Compose v2 plugin ('docker compose', 2.24 or newer)." >&2
    echo "Install it from https://docs.docker.com/engine/install/ and check with: docker compose version" >&2
    exit 1
fi
# depends_on.required and the other newer keys of our compose files need 2.24; older ones reject the files with a
# schema error that does not say so. (An unparsable version, e.g. a dev build, is let through.)
version=$(docker compose version --short 2>/dev/null || true)
if version_before "$version" 2 24; then
    echo "docker compose ${version#v} is too old: RackTwin needs 2.24 or newer (https://docs.docker.com/compose/install/)." >&2
    exit 1
fi
if [ ! -f "$env_file" ]; then
    echo "compose/.env is missing: run 'make up' (it creates the file with random secrets)." >&2
    exit 1
fi

mode=$(env_get "$env_file" TB_MODE)
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
