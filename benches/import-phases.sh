#!/usr/bin/env bash
# The two phases of the 1M load, each alone, with every thread's CPU time:
#   the first member (hospital-a) into an empty database, then the linking member (clinic-b)
#   into a copy of that result, as often as asked.
#
#   cargo bench --bench mpi_scale -- --records 1000000 --import-only --keep   # prints KEPT
#   bash benches/import-phases.sh KEPT [RUNS_OF_B] [HIE_BINARY]
#
# KEPT holds a.ndjson, b.ndjson and certs/ from the bench; the databases go to KEPT/phases/.
set -euo pipefail
kept=$(cd "$1" && pwd); runs=${2:-1}
hie=${3:-$(cd "$(dirname "$0")/.." && pwd)/target/release/hie}
work=$kept/phases
rm -rf "$work"; mkdir -p "$work/data"
cat > "$work/hie.toml" <<TOML
[database]
url = "sqlite://$work/data/hie.db"
[certs]
dir = "$kept/certs"
[log]
filter = "warn"
TOML
for o in hospital-a:urn:bench:a clinic-b:urn:bench:b; do
  "$hie" --config "$work/hie.toml" org add --id "${o%%:*}" --name "${o%%:*}" --type hospital \
    --cert "$kept/certs/orgs/${o%%:*}/client.crt" --identifier-system "${o#*:}" >/dev/null
done
# Runs `hie import`, then prints the CPU seconds of its busiest threads.
import() {
  "$hie" --config "$work/hie.toml" import --org "$1" "$2" &
  local pid=$! line; declare -A cpu=()
  while kill -0 "$pid" 2>/dev/null; do
    for t in /proc/$pid/task/*; do
      line=$(cat "$t/stat" 2>/dev/null) || continue
      line=${line##*) }; set -- $line
      cpu[${t##*/}]=$(( ${12} + ${13} ))
    done
    sleep 0.25
  done
  wait "$pid"
  for t in "${!cpu[@]}"; do echo "${cpu[$t]} $t"; done | sort -rn | head -3 |
    awk -v hz="$(getconf CLK_TCK)" '{ printf "  thread %s: %.1f s of CPU\n", $2, $1 / hz }'
}
import hospital-a "$kept/a.ndjson"
cp "$work/data/hie.db" "$work/after-a.db"
for _ in $(seq "$runs"); do
  rm -f "$work/data/hie.db-wal" "$work/data/hie.db-shm"
  cp "$work/after-a.db" "$work/data/hie.db"
  import clinic-b "$kept/b.ndjson"
done
