#!/usr/bin/env bash
# The server's side of a new key, without any client of ours: pgbench runs the PostgreSQL
# engine's two statements (claim, fenced outcome) on its table, the hand-written protocol's two
# on its own, and the engine's on a slimmer row (no digest, no life columns; fenced on the
# claim token) that a second schema version could use. Same clients, same server, interleaved.
#
#   compare/pgbench/run.sh [pgbench connection options]   (default: -h 127.0.0.1 -U postgres test)
#   CLIENTS="1 4 16" SECONDS_EACH=5 ROUNDS=3 compare/pgbench/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
conn=("$@")
[ ${#conn[@]} -eq 0 ] && conn=(-h 127.0.0.1 -U postgres test)
export PGOPTIONS='-c client_min_messages=warning'
psql -q "${conn[@]}" -f "$here/schema.sql"
trap 'psql -q "${conn[@]}" -c "DROP SCHEMA IF EXISTS idem_pgbench CASCADE"' EXIT
for c in ${CLIENTS:-1 4 16}; do
  for r in $(seq "${ROUNDS:-3}"); do
    for f in engine slim hand; do
      tps=$(pgbench -n -M prepared -c "$c" -j 2 -T "${SECONDS_EACH:-5}" -f "$here/$f.sql" "${conn[@]}" \
        | awk '/^tps/ {print $3}')
      echo "clients=$c round=$r $f: $tps new keys/s"
    done
  done
done
