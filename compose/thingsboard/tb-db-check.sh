#!/bin/sh
# Records in /state/tb-schema whether ThingsBoard is installed in Postgres ("installed", "empty" or "partial"),
# so thingsboard-install runs the one-time INSTALL_TB step only on an empty database. The database is
# the marker: removing the Postgres volume brings the install back, keeping it never repeats it.
set -eu

# "installed" needs the system administrator too, whom the install creates after the schema: a schema without
# one is an install that was cut off ("partial"), which thingsboard-install refuses to build on.
exists=$(psql -v ON_ERROR_STOP=1 -tAc "SELECT to_regclass('public.tb_user') IS NOT NULL")
if [ "$exists" != "t" ]; then
    state=empty
else
    admins=$(psql -v ON_ERROR_STOP=1 -tAc "SELECT count(*) FROM tb_user WHERE authority = 'SYS_ADMIN'")
    if [ "$admins" -gt 0 ]; then state=installed; else state=partial; fi
fi
printf '%s\n' "$state" > /state/tb-schema.tmp
chmod 0644 /state/tb-schema.tmp
mv /state/tb-schema.tmp /state/tb-schema
echo "thingsboard-db-check: schema $state"
