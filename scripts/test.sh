#!/usr/bin/env bash
# The whole test suite: formatting, lints, every crate's tests (the network
# namespace tests included when run as root), the fuzz targets' build.
# Needs only cargo; as root it installs what the namespace tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v iptables-restore >/dev/null || missing+=(iptables)
  command -v setpriv >/dev/null || missing+=(util-linux)
  command -v curl >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  python3 -m venv --help >/dev/null 2>&1 || missing+=(python3 python3-venv)
  command -v chromium >/dev/null || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]} (for the network namespace tests, schema checks and the browser test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (the binaries the end-to-end tests start)"
# `cargo test` builds a package's binaries only for that package's own
# integration tests; the e2e crate starts those of the other packages.
cargo build --workspace --bins --locked

if [ "$(id -u)" = 0 ]; then
  step "the test cluster's control plane (etcd, kube-apiserver, controller-manager, scheduler, kubectl from the Kubernetes Go modules)"
  # A no-op when go.mod, go.sum and the script are unchanged since the last
  # build; the caches are under target/go.
  bash e2e/cluster/build.sh
fi

step "cargo test"
# As root (CI) the end-to-end suite must run its pods in network namespaces
# with transparent capture; a machine that cannot is an error, not a quiet
# fallback. Without root it runs in explicit mode and says so.
if [ "$(id -u)" = 0 ]; then
  echo "end-to-end variant: pods in network namespaces (required as root)"
  MESH_E2E_NAMESPACES=1 cargo test --workspace --locked
  step "end-to-end traffic tests, explicit-mode variant"
  MESH_E2E_EXPLICIT=1 cargo test --locked -p mesh-e2e --test traffic
else
  echo "end-to-end variant: explicit mode on loopback (not root)"
  cargo test --workspace --locked
fi

step "injected manifests against the Kubernetes OpenAPI schemas"
# The golden files are what kube-inject (and the webhook) produce for the
# samples and tricky pods; kubernetes-validate checks them strictly.
venv=target/kubernetes-validate
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'kubernetes-validate==1.37.0'
fi
"$venv/bin/kubernetes-validate" --strict --quiet -k 1.30.0 injector/tests/golden/*.native.out.yaml
"$venv/bin/kubernetes-validate" --strict --quiet -k 1.28.0 injector/tests/golden/*.classic.out.yaml

step "install manifests of every profile against the Kubernetes OpenAPI schemas"
# What `meshctl install` applies (custom resources such as the mesh-wide
# PeerAuthentication are checked by the CRD schemas, not here).
out=target/manifests
mkdir -p "$out"
for profile in minimal default demo; do
  target/debug/meshctl manifest generate --offline --profile "$profile" > "$out/$profile.yaml"
done
target/debug/meshctl manifest generate --offline --profile demo \
  --set pilot.replicas=3 --set ingressGateway.serviceType=NodePort \
  --set ingressGateway.nodePorts.http=30080 --set mtls.mode=STRICT \
  --set kubernetesMinor=28 > "$out/demo-overrides.yaml"
"$venv/bin/kubernetes-validate" --strict --quiet -k 1.30.0 "$out"/{minimal,default,demo}.yaml
"$venv/bin/kubernetes-validate" --strict --quiet -k 1.28.0 "$out/demo-overrides.yaml"

step "the dashboard in a browser"
# meshctl demo with traffic; headless Chromium (Debian's) driven by
# Playwright checks the live graph and saves target/dashboard.png.
if command -v chromium >/dev/null; then
  bash e2e/browser/run.sh target/dashboard.png
else
  echo "chromium is not installed (run as root to have it installed): skipped"
fi

step "fuzz targets build"
# Their own workspace (libFuzzer); the same target dir reuses the main build.
cargo build --manifest-path fuzz/Cargo.toml --target-dir target --locked
