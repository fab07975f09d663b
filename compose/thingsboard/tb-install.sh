#!/bin/bash
# One-time ThingsBoard install (schema, system data and demo tenant: INSTALL_TB=true LOAD_DEMO=true),
# skipped when thingsboard-db-check found the schema. Runs the image's own start script.
set -euo pipefail

state=$(cat /state/tb-schema 2>/dev/null || echo unknown)
case "$state" in
    installed)
        echo "thingsboard-install: schema present, nothing to do"
        exit 0
        ;;
    empty)
        echo "thingsboard-install: empty database, installing ThingsBoard with demo data (takes a few minutes)"
        exec start-tb-node.sh
        ;;
    partial)
        echo "thingsboard-install: the ThingsBoard database has a schema but no system administrator: an earlier" >&2
        echo "install was interrupted. Start over with 'make clean' (deletes all RackTwin data) and 'make up'." >&2
        exit 1
        ;;
    *)
        echo "thingsboard-install: /state/tb-schema says '$state'; thingsboard-db-check did not run" >&2
        exit 1
        ;;
esac
