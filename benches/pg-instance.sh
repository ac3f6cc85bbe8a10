#!/usr/bin/env bash
# A throwaway PostgreSQL server for benchmarks, configured as a production server would be
# rather than as the machine's package installed it (shared_buffers = 128 MB there).
#
#   bash benches/pg-instance.sh start [SHARED_BUFFERS] [PORT]   # default 4GB, 5433; prints the URL
#   PG_SETTINGS="max_wal_size=16GB wal_compression=lz4" bash benches/pg-instance.sh start 4GB
#   bash benches/pg-instance.sh stop [PORT]
#
# Everything else is PostgreSQL's default (fsync and synchronous_commit on, max_wal_size 1 GB)
# unless PG_SETTINGS names more settings, `name=value` separated by spaces.
# The cluster lives in /tmp/hie-pg-PORT and is deleted by `stop`. Needs the postgres user and
# PostgreSQL 15's binaries (Debian: /usr/lib/postgresql/15/bin); run as root or as postgres.
set -euo pipefail
cmd=${1:-start}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "no PostgreSQL binaries under /usr/lib/postgresql" >&2; exit 1; }
as_postgres() {
  if [ "$(id -un)" = postgres ]; then bash -c "$1"; else su postgres -c "$1"; fi
}
case $cmd in
start)
  buffers=${2:-4GB}
  port=${3:-5433}
  dir=/tmp/hie-pg-$port
  mkdir -p "$dir"
  chown postgres "$dir" 2>/dev/null || true
  if [ ! -d "$dir/data" ]; then
    as_postgres "$bin/initdb -D $dir/data -A trust -U postgres" >"$dir/initdb.log"
  fi
  extra=""
  for kv in ${PG_SETTINGS:-}; do extra="$extra -c $kv"; done
  as_postgres "$bin/pg_ctl -D $dir/data -l $dir/log -w -o '-c port=$port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c shared_buffers=$buffers$extra' start" >/dev/null
  db=bench_$(date +%s)
  psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qAtc "CREATE DATABASE $db"
  echo "postgres://postgres@127.0.0.1:$port/$db"
  ;;
stop)
  port=${2:-5433}
  dir=/tmp/hie-pg-$port
  as_postgres "$bin/pg_ctl -D $dir/data -m fast stop" >/dev/null || true
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start [SHARED_BUFFERS] [PORT] | stop [PORT]" >&2
  exit 2
  ;;
esac
