#!/usr/bin/env bash
# Throughput of GET /fhir/metadata over kept-alive mutual TLS, next to nginx serving a static
# file over mutual TLS on the same machine, measured with the same client in one run.
#
#   bash benches/metadata-throughput.sh [SECONDS] [CONNECTIONS]
#
# Needs: oha (cargo install --locked oha), nginx (installed by the baseline script).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-32}
work=$(mktemp -d)
trap 'kill $broker 2>/dev/null || true; bash ../shared/tools/nginx-mtls-baseline.sh stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

cargo build --release -q
hie=target/release/hie
export HIE_CERTS_DIR=$work/certs HIE_DATABASE_URL=sqlite://$work/hie.db HIE_SERVER_LISTEN=127.0.0.1:18443 \
       HIE_ADMIN_LISTEN=127.0.0.1:19090 HIE_RATE_LIMIT_REQUESTS_PER_SECOND=1000000 HIE_RATE_LIMIT_BURST=1000000 \
       HIE_LOG_FILTER=warn
$hie certs init >/dev/null
$hie certs issue --org bench-hospital >/dev/null
$hie org add --id bench-hospital --name Bench --type hospital --cert "$work/certs/orgs/bench-hospital/client.crt" >/dev/null
$hie serve > "$work/serve.log" 2>&1 &
broker=$!
for _ in $(seq 1 50); do grep -q "exchange listening" "$work/serve.log" 2>/dev/null && break; sleep 0.1; done

mkdir -p "$work/static/fhir"
curl -s --cert "$work/certs/orgs/bench-hospital/client.crt" --key "$work/certs/orgs/bench-hospital/client.key" \
     --cacert "$work/certs/ca.crt" https://localhost:18443/fhir/metadata > "$work/static/fhir/metadata"
bash ../shared/tools/nginx-mtls-baseline.sh start --ca "$work/certs/ca.crt" --cert "$work/certs/server.crt" \
     --key "$work/certs/server.key" --port 19443 --root "$work/static" >/dev/null

client=(--cacert "$work/certs/ca.crt" --cert "$work/certs/orgs/bench-hospital/client.crt" --key "$work/certs/orgs/bench-hospital/client.key")
cat > "$work/summary.py" <<'PY'
import json, sys
d = json.load(sys.stdin)
s, p = d["summary"], d["latencyPercentiles"]
print("%.0f %.2f %.2f %.4f" % (s["requestsPerSec"], p["p50"] * 1000, p["p99"] * 1000, s["successRate"]))
PY
run() { oha --no-tui -c "$conns" -z "${secs}s" --output-format json "${client[@]}" "$1" | python3 "$work/summary.py"; }
oha --no-tui -c 4 -n 200 "${client[@]}" https://localhost:18443/fhir/metadata >/dev/null  # warm-up
read -r b_rps b_p50 b_p99 b_ok < <(run https://localhost:18443/fhir/metadata)
read -r n_rps n_p50 n_p99 n_ok < <(run https://localhost:19443/fhir/metadata)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load: oha -c $conns -z ${secs}s, kept-alive mTLS, same client for both"
printf '%-28s %10s %9s %9s %8s\n' target req/s p50_ms p99_ms success
printf '%-28s %10s %9s %9s %8s\n' "hie GET /fhir/metadata" "$b_rps" "$b_p50" "$b_p99" "$b_ok"
printf '%-28s %10s %9s %9s %8s\n' "nginx static metadata" "$n_rps" "$n_p50" "$n_p99" "$n_ok"
python3 -c "print(f'ratio hie/nginx: {$b_rps/$n_rps:.2f}')"
