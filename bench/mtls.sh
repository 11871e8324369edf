#!/usr/bin/env bash
# What mTLS between sidecars costs: the same fixed-rate load (mesh-bench
# load, 1,000 rps over 16 keep-alive connections) and the same wrk
# throughput run, DIRECT to an origin, through two sidecars in PLAINTEXT,
# and through two sidecars over MTLS (certificates from pilot's CA). The
# sidecars run with one worker thread each, pinned to CPU 0; the origin and
# the load generators are pinned to CPU 1. Prints p50/p99 and requests per
# second, with ratios against the direct connection. Everything listens
# and connects on 127.0.0.1.
#
#   bash bench/mtls.sh
#
# Needs: cargo, wrk (installed when missing, as root), taskset.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ $TARGET_DIR != /* ]]; then TARGET_DIR="$ROOT/$TARGET_DIR"; fi
BIN="$TARGET_DIR/release"
RATE=${RATE:-1000}
SECS=${SECS:-10s}
WRK_SECS=${WRK_SECS:-10}

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

if ! command -v wrk >/dev/null 2>&1; then
  [[ $(id -u) -eq 0 ]] || die "needs wrk (run as root to install it)"
  log "installing wrk"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) is not installed"

log "building (release)"
(cd "$ROOT" && cargo build --release -q -p mesh-proxy -p mesh-pilot -p mesh-bench)

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

NEXT_PORT=$((21000 + RANDOM % 8000))
port() {
  NEXT_PORT=$((NEXT_PORT + 1))
  printf -v "$1" '%s' "$NEXT_PORT"
}

wait_http() { # URL WHAT
  for _ in $(seq 1 150); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$2 not ready ($1); logs in $WORK"
}

port ORIGIN
port XDS
port PILOT_HTTP
port CA
port SERVER_IN
for v in SERVER_EXPLICIT SERVER_ADMIN SERVER_METRICS SERVER_READY; do port "$v"; done
for v in PLAIN_EXPLICIT PLAIN_IN PLAIN_ADMIN PLAIN_METRICS PLAIN_READY; do port "$v"; done
for v in MTLS_EXPLICIT MTLS_IN MTLS_ADMIN MTLS_METRICS MTLS_READY; do port "$v"; done

mkdir -p "$WORK/config"
for sa in server plain client; do
  printf '%s-bench-token-%s' "$sa" "$RANDOM$RANDOM" >"$WORK/$sa.token"
done
cat >"$WORK/tokens.yaml" <<EOF
- {namespace: default, serviceAccount: server, token: $(cat "$WORK/server.token")}
- {namespace: default, serviceAccount: plain, token: $(cat "$WORK/plain.token")}
- {namespace: default, serviceAccount: client, token: $(cat "$WORK/client.token")}
EOF

taskset -c 1 "$BIN/mesh-bench" origin --addr "127.0.0.1:$ORIGIN" >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
MESH_LOG=warn "$BIN/mesh-pilot" --config-dir "$WORK/config" --ca-dir "$WORK/ca" \
  --secure-addr "127.0.0.1:$CA" --bootstrap-tokens "$WORK/tokens.yaml" \
  --xds-addr "127.0.0.1:$XDS" --http-addr "127.0.0.1:$PILOT_HTTP" >"$WORK/pilot.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$PILOT_HTTP/ready" pilot

# The receiving sidecar: PERMISSIVE, so that both clients reach it.
cat >"$WORK/server.yaml" <<EOF
workload: {name: server, namespace: default, serviceAccount: server}
inbound:
  ports: [{port: $SERVER_IN, targetPort: $ORIGIN, protocol: HTTP}]
EOF
# A calling sidecar: its explicit port routes to the server's sidecar.
client_config() { # EXPLICIT_PORT IDENTITY
  local identity=""
  [[ -n $2 ]] && identity=", identity: \"$2\""
  cat <<EOF
workload: {name: client, namespace: default, serviceAccount: client}
destinations:
- {host: "127.0.0.1", port: $1, protocol: HTTP, http: [{action: {forward: [{cluster: server}]}}]}
clusters:
- {name: server, service: server.default.svc.cluster.local, protocol: HTTP, endpoints: [{address: "127.0.0.1:$SERVER_IN"$identity}]}
EOF
}
client_config "$PLAIN_EXPLICIT" "" >"$WORK/plain.yaml"
client_config "$MTLS_EXPLICIT" "spiffe://cluster.local/ns/default/sa/server" >"$WORK/mtls.yaml"

sidecar() { # NAME ACCOUNT EXPLICIT INBOUND ADMIN METRICS READY
  MESH_LOG=warn taskset -c 0 "$BIN/mesh-proxy" --mode explicit --config "$WORK/$1.yaml" \
    --concurrency 1 --service-account "$2" \
    --explicit-addr "127.0.0.1:$3" --inbound-addr "127.0.0.1:$4" --admin-addr "127.0.0.1:$5" \
    --metrics-addr "127.0.0.1:$6" --ready-addr "127.0.0.1:$7" \
    --ca-addr "https://127.0.0.1:$CA" --ca-root "$WORK/ca/root-cert.pem" \
    --token-file "$WORK/$2.token" >"$WORK/$1-proxy.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$7/healthz/ready" "sidecar $1"
}
sidecar server server "$SERVER_EXPLICIT" "$SERVER_IN" "$SERVER_ADMIN" "$SERVER_METRICS" "$SERVER_READY"
sidecar plain plain "$PLAIN_EXPLICIT" "$PLAIN_IN" "$PLAIN_ADMIN" "$PLAIN_METRICS" "$PLAIN_READY"
sidecar mtls client "$MTLS_EXPLICIT" "$MTLS_IN" "$MTLS_ADMIN" "$MTLS_METRICS" "$MTLS_READY"

# The mTLS client must really use mTLS, and the plaintext one must not.
curl -fsS -o /dev/null "http://127.0.0.1:$MTLS_EXPLICIT/" || die "no answer through mTLS"
curl -fsS -o /dev/null "http://127.0.0.1:$PLAIN_EXPLICIT/" || die "no answer through plaintext"
metrics=$(curl -fsS "http://127.0.0.1:$SERVER_METRICS/stats/prometheus")
grep -q 'source_principal="spiffe://cluster.local/ns/default/sa/client".*connection_security_policy="mutual_tls"' <<<"$metrics" ||
  die "the server's sidecar saw no mTLS request"

json_num() { sed -n "s/.*\"$2\":\([-0-9.eE+]*\).*/\1/p" <<<"$1" | head -1; }

declare -A P50 P99 RPS
for mode in direct plain mtls; do
  case $mode in
    direct) url="http://127.0.0.1:$ORIGIN/" ;;
    plain) url="http://127.0.0.1:$PLAIN_EXPLICIT/" ;;
    mtls) url="http://127.0.0.1:$MTLS_EXPLICIT/" ;;
  esac
  log "$mode: $RATE rps for $SECS, then wrk for ${WRK_SECS}s"
  out=$(taskset -c 1 "$BIN/mesh-bench" load --url "$url" --rate "$RATE" --duration "$SECS" --warmup 2s)
  P50[$mode]=$(json_num "$out" p50_us)
  P99[$mode]=$(json_num "$out" p99_us)
  w=$(taskset -c 1 wrk -t1 -c16 -d"${WRK_SECS}s" "$url")
  RPS[$mode]=$(awk '/^Requests\/sec:/ { print $2; exit }' <<<"$w")
done

printf '\n%-26s %10s %10s %12s\n' "" "p50 µs" "p99 µs" "max rps"
for mode in direct plain mtls; do
  printf '%-26s %10s %10s %12s\n' "$mode" "${P50[$mode]}" "${P99[$mode]}" "${RPS[$mode]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.0f", a - b }'; }
printf '\n%-26s %10s %10s %12s\n' "vs direct (ratio)" "p50" "p99" "rps"
for mode in plain mtls; do
  printf '%-26s %10s %10s %12s\n' "two sidecars, $mode" \
    "$(ratio "${P50[$mode]}" "${P50[direct]}")" "$(ratio "${P99[$mode]}" "${P99[direct]}")" \
    "$(ratio "${RPS[$mode]}" "${RPS[direct]}")"
done
printf '%-26s %10s %10s %12s\n' "mTLS over plaintext (µs)" \
  "$(added "${P50[mtls]}" "${P50[plain]}")" "$(added "${P99[mtls]}" "${P99[plain]}")" \
  "$(ratio "${RPS[mtls]}" "${RPS[plain]}")"
