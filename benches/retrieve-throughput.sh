#!/usr/bin/env bash
# ITI-68 retrieve through the broker, for a 100 KB and a 10 MB document held by a member
# repository (`hie member-sim`), next to fetching the same bytes directly from the member and
# through nginx as an mTLS reverse proxy to the same member, with the same client in one run.
#
#   bash benches/retrieve-throughput.sh [SECONDS] [CONNECTIONS]
#
# Needs: oha (cargo install --locked oha), nginx (installed by the baseline script), python3, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
conns=${2:-16}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; bash ../shared/tools/nginx-mtls-baseline.sh stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

cargo build --release -q
hie=target/release/hie
export HIE_CERTS_DIR=$work/certs HIE_DATABASE_URL=sqlite://$work/hie.db HIE_SERVER_LISTEN=127.0.0.1:18443 \
       HIE_ADMIN_LISTEN=127.0.0.1:19090 HIE_RATE_LIMIT_REQUESTS_PER_SECOND=1000000 HIE_RATE_LIMIT_BURST=1000000 \
       HIE_LOG_FILTER=warn
certs=$work/certs
$hie certs init >/dev/null
$hie certs issue --org bench-hospital --server-name localhost >/dev/null
$hie certs issue --org bench-clinic >/dev/null
mkdir -p "$work/member/documents"
head -c 102400 /dev/urandom > "$work/member/documents/doc-100k.bin"
head -c 10485760 /dev/urandom > "$work/member/documents/doc-10m.bin"
$hie member-sim --org bench-hospital --listen 127.0.0.1:19600 --data "$work/member" > "$work/member.log" 2>&1 &
pids+=($!)
$hie org add --id bench-hospital --name Hospital --type hospital --cert "$certs/orgs/bench-hospital/client.crt" \
     --identifier-system urn:bench:h --fhir-base https://localhost:19600/fhir >/dev/null
$hie org add --id bench-clinic --name Clinic --type clinic --cert "$certs/orgs/bench-clinic/client.crt" >/dev/null
$hie serve > "$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q "exchange listening" "$work/serve.log" 2>/dev/null && grep -q listening "$work/member.log" && break; sleep 0.1; done

hosp=(--cacert "$certs/ca.crt" --cert "$certs/orgs/bench-hospital/client.crt" --key "$certs/orgs/bench-hospital/client.key")
clinic=(--cacert "$certs/ca.crt" --cert "$certs/orgs/bench-clinic/client.crt" --key "$certs/orgs/bench-clinic/client.key")
broker_cert=(--cacert "$certs/ca.crt" --cert "$certs/client.crt" --key "$certs/client.key")
curl -sf "${hosp[@]}" -X PUT -H 'X-Purpose-Of-Use: TREAT' -H 'Content-Type: application/fhir+json' \
     'https://localhost:18443/fhir/Patient?identifier=urn:bench:h|P1' \
     -d '{"resourceType":"Patient","identifier":[{"system":"urn:bench:h","value":"P1"}],"name":[{"family":"Bench","given":["Pat"]}],"birthDate":"1970-01-01"}' >/dev/null
python3 - "$work/member/documents" > "$work/bundle.json" <<'PY'
import base64, hashlib, json, os, sys
d = sys.argv[1]
entries, items = [], []
for i, name in enumerate(["doc-100k.bin", "doc-10m.bin"]):
    data = open(os.path.join(d, name), "rb").read()
    items.append({"item": {"reference": f"urn:uuid:d{i}"}})
    entries.append({"fullUrl": f"urn:uuid:d{i}", "request": {"method": "POST", "url": "DocumentReference"}, "resource": {
        "resourceType": "DocumentReference", "masterIdentifier": {"value": f"urn:bench:{name}"}, "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "11506-3"}]}],
        "subject": {"identifier": {"system": "urn:bench:h", "value": "P1"}}, "date": "2026-11-01T10:00:00Z",
        "securityLabel": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}]}],
        "content": [{"attachment": {"contentType": "application/octet-stream", "url": f"https://localhost:19600/fhir/Binary/{name}",
                                    "size": len(data), "hash": base64.b64encode(hashlib.sha1(data).digest()).decode()},
                     "format": {"code": "urn:ihe:iti:xds:2017:mimeTypeSufficient"}}]}})
entries.insert(0, {"fullUrl": "urn:uuid:set", "request": {"method": "POST", "url": "List"}, "resource": {
    "resourceType": "List", "identifier": [{"use": "usual", "value": "urn:bench:set"}], "status": "current", "mode": "working",
    "code": {"coding": [{"system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes", "code": "submissionset"}]},
    "subject": {"identifier": {"system": "urn:bench:h", "value": "P1"}}, "date": "2026-11-01T10:00:00Z", "entry": items}})
print(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
PY
curl -sf "${hosp[@]}" -X POST -H 'X-Purpose-Of-Use: TREAT' -H 'Content-Type: application/fhir+json' \
     https://localhost:18443/fhir --data-binary @"$work/bundle.json" > "$work/registered.json"
doc100k=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['entry'][1]['response']['location'].split('/')[1])" "$work/registered.json")
doc10m=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['entry'][2]['response']['location'].split('/')[1])" "$work/registered.json")

bash ../shared/tools/nginx-mtls-baseline.sh start --ca "$certs/ca.crt" --cert "$certs/server.crt" --key "$certs/server.key" \
     --port 19443 --upstream https://127.0.0.1:19600 --upstream-cert "$certs/client.crt" --upstream-key "$certs/client.key" >/dev/null

# The broker must deliver exactly the member's bytes.
curl -sf "${clinic[@]}" -H 'X-Purpose-Of-Use: TREAT' "https://localhost:18443/fhir/Binary/$doc10m" | cmp - "$work/member/documents/doc-10m.bin"

cat > "$work/summary.py" <<'PY'
import json, sys
d = json.load(sys.stdin)
s, p = d["summary"], d["latencyPercentiles"]
print("%.1f %.2f %.2f %.4f" % (s["requestsPerSec"], p["p50"] * 1000, p["p99"] * 1000, s["successRate"]))
PY
run() { # conns seconds url client-args...
  local c=$1 z=$2 url=$3; shift 3
  oha --no-tui -c "$c" -z "${z}s" --output-format json "$@" "$url" | python3 "$work/summary.py"
}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load: oha, kept-alive mTLS; throughput with -c $conns -z ${secs}s, latency with -c 1 -z ${secs}s"
printf '%-8s %-34s %9s %9s %9s %9s %9s\n' size target req/s MB/s p50_ms p99_ms c1_p50_ms
for size in 100k 10m; do
  if [ $size = 100k ]; then bytes=102400; doc=$doc100k; else bytes=10485760; doc=$doc10m; fi
  declare -A rps mbs p50 p99 l50
  for target in direct broker nginx; do
    case $target in
      direct) url=https://localhost:19600/fhir/Binary/doc-$size.bin; args=("${broker_cert[@]}");;
      broker) url=https://localhost:18443/fhir/Binary/$doc; args=("${clinic[@]}" -H 'X-Purpose-Of-Use: TREAT');;
      nginx)  url=https://localhost:19443/fhir/Binary/doc-$size.bin; args=("${clinic[@]}");;
    esac
    oha --no-tui -c 2 -n 20 "${args[@]}" "$url" >/dev/null  # warm-up
    read -r r a b ok < <(run "$conns" "$secs" "$url" "${args[@]}")
    read -r _ l _ _ < <(run 1 "$secs" "$url" "${args[@]}")
    rps[$target]=$r; p50[$target]=$a; p99[$target]=$b; l50[$target]=$l
    mbs[$target]=$(python3 -c "print(f'{$r*$bytes/1048576:.1f}')")
    printf '%-8s %-34s %9s %9s %9s %9s %9s\n' "$size" "$target (success $ok)" "$r" "${mbs[$target]}" "$a" "$b" "$l"
  done
  python3 -c "print(f'$size: broker/direct throughput {${rps[broker]}/${rps[direct]}:.2f}, broker/nginx {${rps[broker]}/${rps[nginx]}:.2f}; added latency (c=1 p50) broker {${l50[broker]}-${l50[direct]}:.2f} ms, nginx {${l50[nginx]}-${l50[direct]}:.2f} ms')"
done
