#!/usr/bin/env bash
# The 1M load's linking member (clinic-b, 167k records into a database holding the first
# member's 833k) alone on PostgreSQL, as often as asked, binaries alternating: each run on a
# fresh copy of one database loaded once, with the write-ahead log's figures of the run.
#
#   cargo bench --bench mpi_scale -- --records 1000000 --import-only --keep   # prints KEPT
#   bash benches/pg-link-phase.sh KEPT RUNS [HIE_BINARY...]
#
# KEPT holds a.ndjson, b.ndjson, certs/ and hie.toml from the bench. Databases: hie_link_a
# (migrated, members enrolled, the first member loaded; kept for the next call) and
# hie_link_run (each run's copy; dropped at the end). PGHOST/PGPORT/PGUSER as for psql
# (default 127.0.0.1:5432, postgres); `DROP DATABASE hie_link_a` when done.
set -euo pipefail
kept=$(cd "$1" && pwd); runs=$2; shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$root/target/release/hie")
host=${PGHOST:-127.0.0.1}; port=${PGPORT:-5432}; user=${PGUSER:-postgres}
psql_() { PGOPTIONS=--client-min-messages=warning psql -h "$host" -p "$port" -U "$user" -d postgres -qAtc "$1"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
config() { sed "s#^url = .*#url = \"postgres://$user@$host:$port/$1\"#" "$kept/hie.toml" > "$work/$1.toml"; }
if [ -z "$(psql_ "SELECT 1 FROM pg_database WHERE datname = 'hie_link_a'")" ]; then
  psql_ "CREATE DATABASE hie_link_a"
  config hie_link_a
  hie=${bins[0]}
  "$hie" --config "$work/hie_link_a.toml" migrate
  for o in hospital-a:urn:bench:a clinic-b:urn:bench:b; do
    "$hie" --config "$work/hie_link_a.toml" org add --id "${o%%:*}" --name "${o%%:*}" \
      --type hospital --cert "$kept/certs/orgs/${o%%:*}/client.crt" \
      --identifier-system "${o#*:}" >/dev/null
  done
  "$hie" --config "$work/hie_link_a.toml" import --org hospital-a "$kept/a.ndjson"
fi
config hie_link_run
for _ in $(seq "$runs"); do
  for bin in "${bins[@]}"; do
    psql_ "DROP DATABASE IF EXISTS hie_link_run"
    psql_ "CREATE DATABASE hie_link_run TEMPLATE hie_link_a"
    # The copy's pages written out before the run, not during it.
    psql_ "CHECKPOINT"
    sync
    psql_ "SELECT pg_stat_reset_shared('wal')"
    echo "== $bin"
    "$bin" --config "$work/hie_link_run.toml" import --org clinic-b "$kept/b.ndjson" | tail -1
    psql_ "SELECT 'log ' || round(wal_bytes / 1e6) || ' MB, ' || wal_fpi || ' page images, buffers full ' || wal_buffers_full || ' times' FROM pg_stat_wal"
  done
done
psql_ "DROP DATABASE IF EXISTS hie_link_run"
