#!/usr/bin/env bash
# The mesh-proxy benchmark program: every scenario first DIRECT to an origin,
# then THROUGH the proxy (gateway mode, one worker thread pinned to CPU 0),
# with the origins and load generators pinned to CPU 1. Prints a table, the
# targets with PASS/MISS, and writes the same as JSON to
# bench/results/latest.json. Everything listens and connects on 127.0.0.1.
#
#   bash bench/run.sh
#
# Needs: cargo, and (installed when missing, as root) wrk, h2load
# (nghttp2-client); taskset (util-linux). A full run takes about 2.5 minutes
# after the build.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS_DIR="$ROOT/bench/results"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ $TARGET_DIR != /* ]]; then TARGET_DIR="$ROOT/$TARGET_DIR"; fi
BIN="$TARGET_DIR/release"

# Scenario lengths (seconds); the issue's numbers.
WRK_SECS=10
H2_SECS=10
RATE=1000
RATE_SECS=15
RATE_WARMUP=2s

PROXY_CPU=0
LOAD_CPU=1

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- tools

install_tools() {
  local need=()
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v socat >/dev/null 2>&1 || need+=(socat)
  command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
  if ((${#need[@]})); then
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
      command -v sudo >/dev/null 2>&1 || die "need ${need[*]} installed (run as root, or install them)"
      sudo=(sudo)
    fi
    log "installing ${need[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  command -v wrk >/dev/null 2>&1 || die "wrk is not installed"
  command -v h2load >/dev/null 2>&1 || die "h2load (nghttp2-client) is not installed"
  command -v socat >/dev/null 2>&1 || die "socat is not installed"
  command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) is not installed"
  [[ $(nproc --all) -ge 2 ]] || die "needs at least 2 CPUs (proxy on CPU $PROXY_CPU, load on CPU $LOAD_CPU)"
}

# ---------------------------------------------------------------- processes

PIDS=()
WORK=""
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  [[ -n $WORK ]] && rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

declare -A TAKEN_PORTS=()
# free_port VAR: a port nothing listens on, outside the ephemeral range.
free_port() {
  local p _
  for _ in $(seq 1 500); do
    p=$((20000 + RANDOM % 12000))
    [[ -n ${TAKEN_PORTS[$p]:-} ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      TAKEN_PORTS[$p]=1
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free port found"
}

# wait_port PORT PID WHAT: until PORT accepts connections (10 s at most).
wait_port() {
  local _
  for _ in $(seq 1 100); do
    kill -0 "$2" 2>/dev/null || die "$3 exited at start (log: $WORK/${3}.log)"$'\n'"$(tail -20 "$WORK/${3}.log" 2>/dev/null)"
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$3 does not listen on 127.0.0.1:$1 after 10 s"$'\n'"$(tail -20 "$WORK/${3}.log" 2>/dev/null)"
}

# ---------------------------------------------------------------- /proc

CLK_TCK=$(getconf CLK_TCK)

# CPU time of a process (all threads), in clock ticks.
proc_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

# CPU time of a process from the scheduler (all threads), in ns: exact,
# where /proc/PID/stat is sampled at the tick and can alias with a periodic
# load.
proc_sched_ns() { cat "/proc/$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f\n", s }'; }

now() { printf '%s\n' "${EPOCHREALTIME:-$(date +%s.%N)}"; }

# Resident set of a process, kB.
proc_rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true; }

# "busy0 total0 busy1 total1" from /proc/stat, in ticks.
cpu_snapshot() {
  awk -v a="cpu$PROXY_CPU" -v b="cpu$LOAD_CPU" '
    $1 == a || $1 == b {
      total = 0; for (i = 2; i <= NF; i++) total += $i
      idle = $5 + $6
      out[$1] = (total - idle) " " total
    }
    END { print out[a], out[b] }' /proc/stat
}

# Samples the proxy's RSS every 200 ms into $WORK/rss.log ("time kB").
rss_sampler() {
  local pid=$1 v
  while kill -0 "$pid" 2>/dev/null; do
    v=$(proc_rss_kb "$pid")
    [[ -n $v ]] && printf '%s %s\n' "$(now)" "$v" >>"$WORK/rss.log"
    sleep 0.2
  done
}

# rss_max [FROM TO]: the largest RSS sampled (between two times), kB.
rss_max() {
  awk -v a="${1:-0}" -v b="${2:-1e18}" '$1 >= a && $1 <= b && $2 > m { m = $2 } END { if (m) print m }' \
    "$WORK/rss.log" 2>/dev/null || true
}

# ---------------------------------------------------------------- parsing

# Converts wrk's "298.00us" / "1.23ms" / "2.00s" / "1.00m" to microseconds.
to_us() {
  awk '{
    v = $1
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.1f\n", v }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.1f\n", v * 1000 }
    else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.1f\n", v * 60000000 }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.1f\n", v * 1000000 }
  }'
}

wrk_rps() { awk '/^Requests\/sec:/ { print $2; exit }' <<<"$1"; }
wrk_pct() { awk -v p="$2" '$1 == p { print $2; exit }' <<<"$1" | to_us; }
wrk_errors() {
  awk '
    /Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx responses:/ { n += $NF }
    END { print n + 0 }' <<<"$1"
}

h2load_rps() { sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$1" | head -1; }
h2load_errors() {
  awk '
    /^requests:/ { gsub(/,/, ""); n += $10 + $12 + $14 }
    /^status codes:/ { gsub(/,/, ""); n += $5 + $7 + $9 }
    END { print n + 0 }' <<<"$1"
}

# json_num JSON KEY: a number field of a one-line JSON object.
json_num() { sed -n "s/.*\"$2\":\([-0-9.eE+]*\).*/\1/p" <<<"$1" | head -1; }

# calc EXPR: awk arithmetic on the given values, "" when any is empty.
calc() {
  local expr=$1
  shift
  local v
  for v in "$@"; do [[ -n $v ]] || return 0; done
  awk -v a="${1:-0}" -v b="${2:-0}" -v c="${3:-0}" -v d="${4:-0}" "BEGIN { $expr }" 2>/dev/null || true
}

# ---------------------------------------------------------------- running

declare -A RPS P50 P99 ERRS PCORES PBUSY PSCHED BUSY0 BUSY1 RSS NOTE

# run_case SCENARIO MODE(direct|proxy) TOOL(wrk|h2load|load) URL [tool args...]
run_case() {
  local sc=$1 mode=$2 tool=$3 url=$4
  shift 4
  local key="$sc,$mode" out t0 t1 c0 c1 n0 n1 s0 s1 wall r
  log "$sc $mode: $tool $* $url"
  s0=$(cpu_snapshot)
  c0=$(proc_ticks "$PROXY_PID")
  n0=$(proc_sched_ns "$PROXY_PID")
  t0=$(now)
  case $tool in
    wrk) out=$(taskset -c "$LOAD_CPU" wrk "$@" --latency "$url" 2>&1) || true ;;
    h2load) out=$(taskset -c "$LOAD_CPU" h2load "$@" "$url" 2>&1) || true ;;
    load) out=$(taskset -c "$LOAD_CPU" "$BIN/mesh-bench" load --url "$url" "$@" 2>&1) || true ;;
  esac
  t1=$(now)
  c1=$(proc_ticks "$PROXY_PID")
  n1=$(proc_sched_ns "$PROXY_PID")
  s1=$(cpu_snapshot)
  kill -0 "$PROXY_PID" 2>/dev/null || die "the proxy died during $sc $mode"$'\n'"$(tail -20 "$WORK/proxy.log")"
  printf '%s\n' "$out" >"$WORK/$sc-$mode.out"

  case $tool in
    wrk)
      RPS[$key]=$(wrk_rps "$out")
      P50[$key]=$(wrk_pct "$out" "50%")
      P99[$key]=$(wrk_pct "$out" "99%")
      ERRS[$key]=$(wrk_errors "$out")
      ;;
    h2load)
      RPS[$key]=$(h2load_rps "$out")
      P50[$key]=""
      P99[$key]=""
      ERRS[$key]=$(h2load_errors "$out")
      ;;
    load)
      local json
      json=$(grep -m1 '^{' <<<"$out" || true)
      RPS[$key]=$(json_num "$json" achieved_rps)
      P50[$key]=$(json_num "$json" p50_us)
      P99[$key]=$(json_num "$json" p99_us)
      ERRS[$key]=$(json_num "$json" errors)
      ;;
  esac
  if [[ -z ${RPS[$key]} ]]; then
    warn "could not parse $tool's output for $sc $mode; its output was:"
    tail -20 <<<"$out" | while IFS= read -r line; do printf '    %s\n' "$line"; done >&2
    NOTE[$key]="$tool output not parsed"
  fi
  if [[ ${ERRS[$key]:-0} != 0 ]]; then
    warn "$sc $mode: ${ERRS[$key]} errors reported by $tool"
  fi

  wall=$(calc 'print b - a' "$t0" "$t1")
  # Busy cores on each CPU over the run (1.0 = one core saturated).
  read -r b0a t0a b1a t1a <<<"$s0"
  read -r b0b t0b b1b t1b <<<"$s1"
  BUSY0[$key]=$(calc 'printf "%.2f", (b - a) / (d - c)' "$b0a" "$b0b" "$t0a" "$t0b")
  BUSY1[$key]=$(calc 'printf "%.2f", (b - a) / (d - c)' "$b1a" "$b1b" "$t1a" "$t1b")
  if [[ $mode == proxy ]]; then
    # Proxy CPU seconds over the wall time: cores used; per 1,000 rps.
    PBUSY[$key]=$(calc 'printf "%.3f", (b - a) / c / d' "$c0" "$c1" "$CLK_TCK" "$wall")
    PSCHED[$key]=$(calc 'printf "%.3f", (b - a) / 1e9 / c' "$n0" "$n1" "$wall")
    RSS[$key]=$(rss_max "$t0" "$t1")
    r=$(proc_rss_kb "$PROXY_PID")
    if [[ -n $r ]] && ((r > ${RSS[$key]:-0})); then RSS[$key]=$r; fi
    if [[ -n ${RPS[$key]} ]] && [[ ${RPS[$key]} != 0 ]]; then
      PCORES[$key]=$(calc 'printf "%.4f", b / (a / 1000)' "${RPS[$key]}" "${PBUSY[$key]}")
    fi
  fi
  sleep 0.5
}

# ---------------------------------------------------------------- main

install_tools

log "building mesh-proxy and mesh-bench (release)"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p mesh-proxy -p mesh-bench
[[ -x $BIN/mesh-proxy && -x $BIN/mesh-bench ]] || die "built binaries not found in $BIN"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mesh-bench.XXXXXX")
BENCH_START=$(now)

# Is anything else busy? Other work on these CPUs skews every number.
s0=$(cpu_snapshot)
sleep 1
s1=$(cpu_snapshot)
idle_busy=$(awk -v s0="$s0" -v s1="$s1" 'BEGIN {
  split(s0, x, " "); split(s1, y, " ")
  t = (y[2] - x[2]) + (y[4] - x[4])
  printf "%.2f", (t > 0 ? ((y[1] - x[1]) + (y[3] - x[3])) / t : 0)
}')
if awk -v v="$idle_busy" 'BEGIN { exit !(v > 0.15) }'; then
  warn "the CPUs are $(calc 'printf "%.0f%%", a * 100' "$idle_busy") busy before the benchmark starts: results will be noisy"
fi

free_port ORIGIN_1K
free_port ORIGIN_64K
free_port ORIGIN_CTL
free_port RELAY_PORT
free_port GW_1K
free_port GW_64K
free_port ADMIN_PORT
free_port METRICS_PORT
free_port READY_PORT

log "starting origins on 127.0.0.1:$ORIGIN_1K (1 KiB) and 127.0.0.1:$ORIGIN_64K (64 KiB), CPU $LOAD_CPU"
taskset -c "$LOAD_CPU" "$BIN/mesh-bench" origin --addr "127.0.0.1:$ORIGIN_1K" --body-size 1024 \
  >"$WORK/origin-1k.log" 2>&1 &
PIDS+=($!)
ORIGIN_1K_PID=$!
taskset -c "$LOAD_CPU" "$BIN/mesh-bench" origin --addr "127.0.0.1:$ORIGIN_64K" --body-size 65536 \
  >"$WORK/origin-64k.log" 2>&1 &
PIDS+=($!)
ORIGIN_64K_PID=$!
wait_port "$ORIGIN_1K" "$ORIGIN_1K_PID" origin-1k
wait_port "$ORIGIN_64K" "$ORIGIN_64K_PID" origin-64k

cat >"$WORK/proxy.yaml" <<EOF
version: bench
workload:
  name: bench-gateway
  namespace: bench
clusters:
  - name: origin-1k
    service: origin-1k.bench
    endpoints:
      - address: 127.0.0.1:$ORIGIN_1K
  - name: origin-64k
    service: origin-64k.bench
    endpoints:
      - address: 127.0.0.1:$ORIGIN_64K
gatewayListeners:
  - port: $GW_1K
    protocol: HTTP
    virtualHosts:
      - hosts: ["*"]
        routes:
          - name: origin-1k
            action:
              forward:
                - cluster: origin-1k
  - port: $GW_64K
    protocol: HTTP
    virtualHosts:
      - hosts: ["*"]
        routes:
          - name: origin-64k
            action:
              forward:
                - cluster: origin-64k
EOF

log "starting mesh-proxy (gateway, --concurrency 1) on 127.0.0.1:$GW_1K and :$GW_64K, CPU $PROXY_CPU"
taskset -c "$PROXY_CPU" "$BIN/mesh-proxy" --config "$WORK/proxy.yaml" --mode gateway \
  --gateway-bind 127.0.0.1 --concurrency 1 \
  --admin-addr "127.0.0.1:$ADMIN_PORT" --metrics-addr "127.0.0.1:$METRICS_PORT" \
  --ready-addr "127.0.0.1:$READY_PORT" >"$WORK/proxy.log" 2>&1 &
PIDS+=($!)
PROXY_PID=$!
wait_port "$GW_1K" "$PROXY_PID" proxy
wait_port "$GW_64K" "$PROXY_PID" proxy
sleep 1
RSS_IDLE=$(proc_rss_kb "$PROXY_PID")
rss_sampler "$PROXY_PID" &
PIDS+=($!)

# A few requests through each listener: the proxy must route before we
# measure anything.
for port in "$GW_1K" "$GW_64K"; do
  smoke=$(taskset -c "$LOAD_CPU" "$BIN/mesh-bench" load --url "http://127.0.0.1:$port/" \
    --rate 200 --duration 1s --connections 4 2>&1 || true)
  count=$(json_num "$smoke" count)
  if [[ -z $count || $count == 0 ]]; then
    die "no request through the proxy on :$port succeeded: $smoke"$'\n'"$(tail -20 "$WORK/proxy.log")"
  fi
  [[ $(json_num "$smoke" errors) == 0 ]] || warn "smoke test through :$port had errors: $smoke"
done

D1="http://127.0.0.1:$ORIGIN_1K/"
D64="http://127.0.0.1:$ORIGIN_64K/"
P1="http://127.0.0.1:$GW_1K/"
P64="http://127.0.0.1:$GW_64K/"

# Warm the proxy's upstream pool and allocator (not measured).
taskset -c "$LOAD_CPU" wrk -t1 -c32 -d2s "$P1" >/dev/null 2>&1 || true
sleep 0.5

SCENARIOS=(a b c d e)
declare -A TITLE=(
  [a]="a) h1 keep-alive 1KiB c=32"
  [b]="b) h1 keep-alive 64KiB c=32"
  [c]="c) h1 conn-per-req 1KiB c=16"
  [d]="d) h2c 1 conn x 16 streams"
  [e]="e) fixed 1000 rps 1KiB"
)
E_ARGS=(--rate "$RATE" --duration "${RATE_SECS}s" --warmup "$RATE_WARMUP" --connections 16)

# Control for (e): direct again, but with the origin on the proxy's CPU, so
# each request crosses CPUs as it does through the proxy. What it adds over
# "direct" is the machine's cross-CPU wake-up cost, not the proxy's.
control_case() {
  log "starting a control origin on 127.0.0.1:$ORIGIN_CTL, CPU $PROXY_CPU"
  taskset -c "$PROXY_CPU" "$BIN/mesh-bench" origin --addr "127.0.0.1:$ORIGIN_CTL" --body-size 1024 \
    >"$WORK/origin-ctl.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$ORIGIN_CTL" "$pid" origin-ctl
  run_case e control load "http://127.0.0.1:$ORIGIN_CTL/" "${E_ARGS[@]}"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# Second control for (e): a plain TCP relay (socat, a process per
# connection, no parsing) on the proxy's CPU in front of the same origin.
# It makes the same CPU crossings as the proxy and does nothing else: what
# it adds over "direct" is the floor for any proxy on this machine.
relay_case() {
  log "starting a TCP relay (socat) on 127.0.0.1:$RELAY_PORT, CPU $PROXY_CPU"
  taskset -c "$PROXY_CPU" socat "TCP-LISTEN:$RELAY_PORT,bind=127.0.0.1,fork,reuseaddr,nodelay" \
    "TCP:127.0.0.1:$ORIGIN_1K,nodelay" >"$WORK/relay.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$RELAY_PORT" "$pid" relay
  run_case e relay load "http://127.0.0.1:$RELAY_PORT/" "${E_ARGS[@]}"
  pkill -P "$pid" 2>/dev/null || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

for mode in direct proxy; do
  if [[ $mode == direct ]]; then u1=$D1 u64=$D64; else u1=$P1 u64=$P64; fi
  run_case a "$mode" wrk "$u1" -t1 -c32 "-d${WRK_SECS}s"
  run_case b "$mode" wrk "$u64" -t1 -c32 "-d${WRK_SECS}s"
  run_case c "$mode" wrk "$u1" -t1 -c16 "-d${WRK_SECS}s" -H 'Connection: close'
  run_case d "$mode" h2load "$u1" -t1 -c1 -m16 -D "$H2_SECS"
  run_case e "$mode" load "$u1" "${E_ARGS[@]}"
  if [[ $mode == direct ]]; then control_case; relay_case; fi
done

RSS_LOADED=$(rss_max)
v=$(proc_rss_kb "$PROXY_PID")
if [[ -n $v && (-z $RSS_LOADED || $v -gt $RSS_LOADED) ]]; then RSS_LOADED=$v; fi
BENCH_SECS=$(calc 'printf "%.0f", b - a' "$BENCH_START" "$(now)")

# ---------------------------------------------------------------- report

fmt_rps() { if [[ -n $1 ]]; then printf '%.0f' "$1"; else printf 'n/a'; fi; }
fmt_ms() { if [[ -n $1 ]]; then calc 'printf "%+.3f ms", a / 1000' "$1"; else printf 'n/a'; fi; }
fmt_us() { if [[ -n $1 ]]; then calc 'printf "%.0f us", a' "$1"; else printf 'n/a'; fi; }
fmt_mib() { if [[ -n $1 ]]; then calc 'printf "%.1f MiB", a / 1024' "$1"; else printf 'n/a'; fi; }
num_or_null() { if [[ -n $1 ]]; then printf '%s' "$1"; else printf 'null'; fi; }

declare -A RATIO ADD50 ADD99
for s in "${SCENARIOS[@]}"; do
  RATIO[$s]=$(calc 'printf "%.2f", b / a' "${RPS[$s,direct]:-}" "${RPS[$s,proxy]:-}")
  ADD50[$s]=$(calc 'printf "%.1f", b - a' "${P50[$s,direct]:-}" "${P50[$s,proxy]:-}")
  ADD99[$s]=$(calc 'printf "%.1f", b - a' "${P99[$s,direct]:-}" "${P99[$s,proxy]:-}")
done
CTL50=$(calc 'printf "%.1f", b - a' "${P50[e,direct]:-}" "${P50[e,control]:-}")
CTL99=$(calc 'printf "%.1f", b - a' "${P99[e,direct]:-}" "${P99[e,control]:-}")
OVERCTL50=$(calc 'printf "%.1f", b - a' "${P50[e,control]:-}" "${P50[e,proxy]:-}")
OVERCTL99=$(calc 'printf "%.1f", b - a' "${P99[e,control]:-}" "${P99[e,proxy]:-}")
RELAY50=$(calc 'printf "%.1f", b - a' "${P50[e,direct]:-}" "${P50[e,relay]:-}")
RELAY99=$(calc 'printf "%.1f", b - a' "${P99[e,direct]:-}" "${P99[e,relay]:-}")
OVERRELAY50=$(calc 'printf "%.1f", b - a' "${P50[e,relay]:-}" "${P50[e,proxy]:-}")
OVERRELAY99=$(calc 'printf "%.1f", b - a' "${P99[e,relay]:-}" "${P99[e,proxy]:-}")

echo
printf '%-30s | %10s | %10s | %5s | %11s | %11s | %19s\n' \
  scenario "direct rps" "proxy rps" ratio "added p50" "added p99" "proxy cores/1000rps"
printf '%s\n' "-------------------------------+------------+------------+-------+-------------+-------------+--------------------"
for s in "${SCENARIOS[@]}"; do
  printf '%-30s | %10s | %10s | %5s | %11s | %11s | %19s\n' "${TITLE[$s]}" \
    "$(fmt_rps "${RPS[$s,direct]:-}")" "$(fmt_rps "${RPS[$s,proxy]:-}")" "${RATIO[$s]:-n/a}" \
    "$(fmt_ms "${ADD50[$s]}")" "$(fmt_ms "${ADD99[$s]}")" "${PCORES[$s,proxy]:-n/a}"
done
echo "(added p50/p99 of (a)-(c) are under saturation: closed-loop wrk; h2load reports no percentiles)"
echo
printf 'proxy RSS: idle %s kB (%s), loaded (max) %s kB (%s)\n' \
  "${RSS_IDLE:-n/a}" "$(fmt_mib "${RSS_IDLE:-}")" "${RSS_LOADED:-n/a}" "$(fmt_mib "${RSS_LOADED:-}")"

echo
echo "details (CPU $PROXY_CPU = proxy, CPU $LOAD_CPU = origins + load generators; cores busy, 1.00 = saturated;"
echo "proxy cores from /proc/PID/stat (tick-sampled) and from schedstat (exact); proxy RSS = max during the run):"
printf '  %-30s %-7s | %8s | %8s | %8s | %6s | %6s | %6s | %4s | %4s | %9s\n' \
  scenario mode rps p50 p99 errors "p.stat" "p.schd" cpu0 cpu1 "proxy RSS"
for s in "${SCENARIOS[@]}"; do
  modes=(direct proxy)
  [[ $s == e ]] && modes=(direct control relay proxy)
  for mode in "${modes[@]}"; do
    k="$s,$mode"
    printf '  %-30s %-7s | %8s | %8s | %8s | %6s | %6s | %6s | %4s | %4s | %9s%s\n' "${TITLE[$s]}" "$mode" \
      "$(fmt_rps "${RPS[$k]:-}")" "$(fmt_us "${P50[$k]:-}")" "$(fmt_us "${P99[$k]:-}")" \
      "${ERRS[$k]:-n/a}" "${PBUSY[$k]:--}" "${PSCHED[$k]:--}" "${BUSY0[$k]:-?}" "${BUSY1[$k]:-?}" \
      "$(if [[ -n ${RSS[$k]:-} ]]; then fmt_mib "${RSS[$k]}"; else echo -; fi)" "${NOTE[$k]:+  (${NOTE[$k]})}"
  done
done
echo "  (e) control = direct with the origin on CPU $PROXY_CPU: the cross-CPU hop alone adds p50 $(fmt_ms "$CTL50"), p99 $(fmt_ms "$CTL99");"
echo "      through the proxy vs the control: p50 $(fmt_ms "$OVERCTL50"), p99 $(fmt_ms "$OVERCTL99")"
echo "  (e) relay = a plain TCP relay (socat) on CPU $PROXY_CPU: any proxy's floor here adds p50 $(fmt_ms "$RELAY50"), p99 $(fmt_ms "$RELAY99");"
echo "      through the proxy vs the relay: p50 $(fmt_ms "$OVERRELAY50"), p99 $(fmt_ms "$OVERRELAY99")"

# Targets from the issue.
verdict() { if [[ -z $1 ]]; then echo "MISS (not measured)"; elif awk -v v="$1" -v l="$2" "BEGIN { exit !(v $3 l) }"; then echo PASS; else echo MISS; fi; }
T1=$(verdict "${ADD99[e]}" 200 '<=')
T2=$(verdict "${PCORES[a,proxy]:-}" 0.05 '<=')
T3=$(verdict "${RSS_IDLE:-}" 10240 '<=')
T4=$(verdict "${RPS[a,proxy]:-}" 30000 '>=')
echo
echo "targets:"
printf '  %-58s %-14s %s\n' "added p99 at 1,000 rps <= 0.2 ms (e)" "$(fmt_ms "${ADD99[e]}")" "$T1"
printf '  %-58s %-14s %s\n' "proxy cores per 1,000 rps <= 0.05 (a)" "${PCORES[a,proxy]:-n/a}" "$T2"
printf '  %-58s %-14s %s\n' "idle RSS <= 10 MiB" "${RSS_IDLE:-n/a} kB" "$T3"
printf '  %-58s %-14s %s\n' ">= 30,000 rps through one proxy core, 1 KiB keep-alive (a)" "$(fmt_rps "${RPS[a,proxy]:-}") rps" "$T4"

# ---------------------------------------------------------------- JSON

mkdir -p "$RESULTS_DIR"
[[ -f $RESULTS_DIR/.gitignore ]] || printf '*.json\n' >"$RESULTS_DIR/.gitignore"
mode_json() {
  local k=$1
  printf '{"rps": %s, "p50_us": %s, "p99_us": %s, "errors": %s, "cpu0_busy": %s, "cpu1_busy": %s' \
    "$(num_or_null "${RPS[$k]:-}")" "$(num_or_null "${P50[$k]:-}")" "$(num_or_null "${P99[$k]:-}")" \
    "$(num_or_null "${ERRS[$k]:-}")" "$(num_or_null "${BUSY0[$k]:-}")" "$(num_or_null "${BUSY1[$k]:-}")"
  if [[ $k == *,proxy ]]; then
    printf ', "proxy_cores": %s, "proxy_cores_schedstat": %s, "proxy_cores_per_1000rps": %s, "proxy_rss_kb": %s' \
      "$(num_or_null "${PBUSY[$k]:-}")" "$(num_or_null "${PSCHED[$k]:-}")" \
      "$(num_or_null "${PCORES[$k]:-}")" "$(num_or_null "${RSS[$k]:-}")"
  fi
  printf '}'
}
{
  printf '{\n  "date": "%s",\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  printf '  "commit": "%s",\n' "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  printf '  "setup": {"proxy_cpu": %s, "load_cpu": %s, "proxy_concurrency": 1, "wrk_seconds": %s, "h2load_seconds": %s, "rate": %s, "rate_seconds": %s, "bench_seconds": %s},\n' \
    "$PROXY_CPU" "$LOAD_CPU" "$WRK_SECS" "$H2_SECS" "$RATE" "$RATE_SECS" "$(num_or_null "$BENCH_SECS")"
  printf '  "scenarios": [\n'
  first=1
  for s in "${SCENARIOS[@]}"; do
    [[ $first == 1 ]] || printf ',\n'
    first=0
    printf '    {"id": "%s", "title": "%s",\n' "$s" "${TITLE[$s]}"
    printf '     "direct": %s,\n' "$(mode_json "$s,direct")"
    if [[ $s == e ]]; then
      printf '     "control_origin_on_proxy_cpu": %s,\n' "$(mode_json "$s,control")"
      printf '     "relay_socat_on_proxy_cpu": %s,\n' "$(mode_json "$s,relay")"
    fi
    printf '     "proxy": %s,\n' "$(mode_json "$s,proxy")"
    printf '     "ratio": %s, "added_p50_us": %s, "added_p99_us": %s}' \
      "$(num_or_null "${RATIO[$s]:-}")" "$(num_or_null "${ADD50[$s]:-}")" "$(num_or_null "${ADD99[$s]:-}")"
  done
  printf '\n  ],\n'
  printf '  "rss_kb": {"idle": %s, "loaded": %s},\n' "$(num_or_null "${RSS_IDLE:-}")" "$(num_or_null "${RSS_LOADED:-}")"
  printf '  "targets": [\n'
  printf '    {"name": "added p99 at 1000 rps <= 200 us", "value": %s, "result": "%s"},\n' "$(num_or_null "${ADD99[e]:-}")" "$T1"
  printf '    {"name": "proxy cores per 1000 rps <= 0.05", "value": %s, "result": "%s"},\n' "$(num_or_null "${PCORES[a,proxy]:-}")" "$T2"
  printf '    {"name": "idle RSS <= 10240 kB", "value": %s, "result": "%s"},\n' "$(num_or_null "${RSS_IDLE:-}")" "$T3"
  printf '    {"name": "rps through one proxy core >= 30000", "value": %s, "result": "%s"}\n' "$(num_or_null "${RPS[a,proxy]:-}")" "$T4"
  printf '  ]\n}\n'
} >"$RESULTS_DIR/latest.json"
echo
echo "results written to ${RESULTS_DIR#"$ROOT"/}/latest.json (benchmark ${BENCH_SECS:-?} s, build excluded)"
