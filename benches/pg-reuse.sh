#!/usr/bin/env bash
# The running broker measured on PostgreSQL without loading 1M records each time: every run
# gets a fresh copy (CREATE DATABASE … TEMPLATE) of one database loaded once, so that runs of
# two builds can alternate on the same data.
#
#   createdb -h 127.0.0.1 -U postgres hie_loaded
#   cargo bench --bench mpi_scale -- --records 1000000 --import-only --keep \
#       --database-url postgres://postgres@127.0.0.1:5432/hie_loaded        # prints KEPT
#   bash benches/pg-reuse.sh KEPT hie_loaded RUNS [HIE_BINARY...] -- [mpi_scale args]
#
# e.g. `bash benches/pg-reuse.sh /tmp/.tmpXYZ hie_loaded 3 /tmp/hie.old /tmp/hie.new --
# --http-records 20000 --queries 100`. With no binary, target/release/hie. A binary is copied
# over target/release/hie for its runs (the bench runs that path); rebuild afterwards.
# PGHOST/PGPORT/PGUSER as for psql (default 127.0.0.1:5432, postgres). PG_URL_QUERY is appended
# to the broker's database URL, e.g. `PG_URL_QUERY='?host=/var/run/postgresql'` for the Unix
# socket (no TLS on loopback: BENCHMARKS.md, session 33).
set -euo pipefail
kept=$(cd "$1" && pwd); template=$2; runs=$3; shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
bins=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do bins+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#bins[@]} -gt 0 ] || bins=("$root/target/release/hie")
host=${PGHOST:-127.0.0.1}; port=${PGPORT:-5432}; user=${PGUSER:-postgres}
psql_() { PGOPTIONS=--client-min-messages=warning psql -h "$host" -p "$port" -U "$user" -d postgres -qAtc "$1"; }
bench=$(ls -t "$root"/target/release/deps/mpi_scale-* 2>/dev/null | grep -v '\.d$' | head -1)
[ -n "$bench" ] || { echo "build the bench first: cargo bench --bench mpi_scale --no-run" >&2; exit 1; }
copy=${template}_run
psql_ "CHECKPOINT"
for _ in $(seq "$runs"); do
  for bin in "${bins[@]}"; do
    [ "$bin" -ef "$root/target/release/hie" ] || cp "$bin" "$root/target/release/hie"
    psql_ "DROP DATABASE IF EXISTS $copy"
    psql_ "CREATE DATABASE $copy TEMPLATE $template"
    # The copy's pages written out before the run, not during it.
    psql_ "CHECKPOINT"
    sync
    sed -i "s#^url = .*#url = \"postgres://$user@$host:$port/$copy${PG_URL_QUERY:-}\"#" "$kept/hie.toml"
    echo "== $bin"
    "$bench" --reuse "$kept" --database-url "postgres://$user@$host:$port/$copy${PG_URL_QUERY:-}" "$@" |
      grep -E "HTTP feed|batches|latency|database size"
  done
done
psql_ "DROP DATABASE IF EXISTS $copy"
