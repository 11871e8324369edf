#!/usr/bin/env bash
# Builds the cluster's control plane from the Go modules pinned in go.mod:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl,
# unmodified, with Kubernetes' version stamped as its own release does.
# Module and build caches live under target/; a stamp of go.mod, go.sum and
# this script skips the build when nothing changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="$root/target/cluster/bin"
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly
export GOMODCACHE="$root/target/go/mod" GOCACHE="$root/target/go/cache"
command -v go >/dev/null || { echo "e2e/cluster: go is not installed" >&2; exit 1; }

stamp="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -d' ' -f1)"
tools=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
if [ -f "$bin/.stamp" ] && [ "$(cat "$bin/.stamp")" = "$stamp" ]; then
  ok=1
  for t in "${tools[@]}"; do [ -x "$bin/$t" ] || ok=0; done
  [ $ok = 1 ] && exit 0
fi

version="$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$here/go.mod")"
minor="$(echo "$version" | cut -d. -f2)"
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
mkdir -p "$bin"
cd "$here"
start=$(date +%s)
echo "e2e/cluster: building Kubernetes $version and etcd (go $(go env GOVERSION))"
go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
for t in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  go build -trimpath -ldflags "$ldflags" -o "$bin/$t" "k8s.io/kubernetes/cmd/$t"
done
echo "$stamp" > "$bin/.stamp"
echo "e2e/cluster: built in $(( $(date +%s) - start )) s into target/cluster/bin"
