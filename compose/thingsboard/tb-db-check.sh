#!/bin/sh
# Records in /state/tb-schema whether ThingsBoard's schema exists in Postgres ("installed" or "empty"),
# so thingsboard-install runs the one-time INSTALL_TB step only on an empty database. The database is
# the marker: removing the Postgres volume brings the install back, keeping it never repeats it.
set -eu

exists=$(psql -v ON_ERROR_STOP=1 -tAc "SELECT to_regclass('public.tb_user') IS NOT NULL")
if [ "$exists" = "t" ]; then state=installed; else state=empty; fi
printf '%s\n' "$state" > /state/tb-schema.tmp
chmod 0644 /state/tb-schema.tmp
mv /state/tb-schema.tmp /state/tb-schema
echo "thingsboard-db-check: schema $state"
