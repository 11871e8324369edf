#!/usr/bin/env bash
# The dashboard in a real browser: starts `meshctl demo` on free ports,
# sends bookinfo traffic through its gateway, and checks with headless
# Chromium (Playwright) that pilot's dashboard draws every bookinfo service
# with its edges and non-zero rates; saves a screenshot.
#
# Usage: e2e/browser/run.sh [SCREENSHOT]   (default target/dashboard.png)
# Needs: the workspace's binaries built (cargo build --workspace --bins),
# python3 with venv, and chromium (as root, scripts/test.sh installs both).
set -euo pipefail
cd "$(dirname "$0")/../.."

shot="${1:-target/dashboard.png}"
venv=target/browser-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import playwright' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r e2e/browser/requirements.txt
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
gateway=$(free_port)
xds=$(free_port)
status=$(free_port)
home=$(mktemp -d)
log="$home/demo.log"
MESH_HOME="$home" target/debug/meshctl demo --gateway-port "$gateway" \
  --xds-addr "127.0.0.1:$xds" --status-addr "127.0.0.1:$status" >"$log" 2>&1 &
demo=$!
cleanup() {
  kill "$demo" 2>/dev/null || true
  wait "$demo" 2>/dev/null || true
  rm -rf "$home"
}
trap cleanup EXIT

# Ready when the gateway serves the product page (bounded: 60 s).
for _ in $(seq 1 120); do
  if python3 - "$gateway" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/productpage", timeout=2).read()
PY
  if ! kill -0 "$demo" 2>/dev/null; then
    echo "meshctl demo exited:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.5
done

mkdir -p "$(dirname "$shot")"
"$venv/bin/python" e2e/browser/dashboard.py "http://127.0.0.1:$status" "$shot" \
  --expect ingressgateway,productpage,details,reviews,ratings \
  --traffic "http://127.0.0.1:$gateway/productpage" --timeout 60
echo "dashboard screenshot: $shot"
