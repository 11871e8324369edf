#!/usr/bin/env bash
# The kind end-to-end run: a kind cluster, the mesh's images built and
# loaded, `meshctl install --profile demo`, bookinfo with automatic
# injection (traffic through the ingress gateway, an 80/20 canary, mesh-wide
# STRICT mTLS), callme injected by `meshctl kube-inject`, `meshctl check`,
# and an uninstall that leaves nothing behind. See e2e/kind/README.md.
#
# Environment: KIND_CLUSTER (default mesh-e2e), TAG (image tag, default
# e2e), KEEP_CLUSTER=1 (keep the cluster afterwards).
#
# Without Docker, kind or kubectl it says what is missing and exits 0.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  list="${missing[*]}"
  echo "e2e/kind: skipped: not found on PATH: ${list// /, }. This test needs Docker, kind and kubectl."
  exit 0
fi
if ! docker info >/dev/null 2>&1; then
  echo "e2e/kind: skipped: 'docker info' failed (the Docker daemon does not answer). This test needs Docker, kind and kubectl."
  exit 0
fi
for tool in cargo curl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "e2e/kind: FAIL: expected $tool on PATH (the run builds meshctl and calls the gateway), found none" >&2
    exit 1
  fi
done

CLUSTER="${KIND_CLUSTER:-mesh-e2e}"
TAG="${TAG:-e2e}"
# The sample manifests name mesh/examples-*:latest, so the images are
# built under the default hub whatever HUB says elsewhere.
export HUB=mesh
MESHCTL="${CARGO_TARGET_DIR:-target}/release/meshctl"
GATEWAY="http://127.0.0.1:8080"
BOOKINFO=samples/bookinfo

# A kubeconfig of our own: kubectl and meshctl talk to this cluster and the
# user's current context is left alone.
workdir="$(mktemp -d)"
export KUBECONFIG="$workdir/kubeconfig"

step() { printf '\n==> %s\n' "$*"; }
fail() {
  echo "e2e/kind: FAIL: $*" >&2
  exit 1
}

diagnose() {
  echo "---- cluster state at the failure ----" >&2
  kubectl --request-timeout=10s get pods -A -o wide >&2
  kubectl --request-timeout=10s get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 >&2
  for d in mesh-pilot mesh-injector mesh-ingressgateway; do
    echo "---- logs of mesh-system/$d (last 40 lines) ----" >&2
    kubectl --request-timeout=10s -n mesh-system logs "deploy/$d" --all-containers --tail=40 >&2
  done
}

cleanup() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ] && [ -s "$KUBECONFIG" ]; then
    diagnose
  fi
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "keeping kind cluster $CLUSTER (KEEP_CLUSTER=1); 'kind export kubeconfig --name $CLUSTER' points kubectl at it, 'kind delete cluster --name $CLUSTER' removes it"
  else
    step "kind delete cluster --name $CLUSTER"
    kind delete cluster --name "$CLUSTER"
  fi
  rm -rf "$workdir"
  exit "$rc"
}
trap cleanup EXIT

# A GET through the gateway: sets HTTP_CODE (000 when there was no answer)
# and HTTP_BODY.
HTTP_CODE=000
HTTP_BODY=
http_get() {
  local out
  out="$(curl -sS --max-time 10 -w '\n%{http_code}' "$GATEWAY$1" 2>/dev/null)" || true
  HTTP_CODE="${out##*$'\n'}"
  HTTP_BODY="${out%$'\n'*}"
  [ -n "$HTTP_CODE" ] || HTTP_CODE=000
}

# Every pod labelled app in namespace $1 carries the injection status
# annotation and a container or init container named mesh-proxy.
check_sidecars() {
  local ns="$1" lines name status containers count=0
  lines="$(kubectl get pods -n "$ns" -l app -o jsonpath='{range .items[*]}{.metadata.name}{"|"}{.metadata.annotations.sidecar\.mesh\.dev/status}{"|"}{range .spec.initContainers[*]}{.name}{","}{end}{range .spec.containers[*]}{.name}{","}{end}{"\n"}{end}')"
  while IFS='|' read -r name status containers; do
    [ -n "$name" ] || continue
    count=$((count + 1))
    if [ -z "$status" ]; then
      fail "pod $ns/$name: expected annotation sidecar.mesh.dev/status, the pod has none (containers: ${containers%,})"
    fi
    case ",$containers" in
      *,mesh-proxy,*) ;;
      *) fail "pod $ns/$name: expected a container or init container named mesh-proxy, saw: ${containers%,}" ;;
    esac
    echo "  $ns/$name: injected (${containers%,})"
  done <<<"$lines"
  if [ "$count" -eq 0 ]; then
    fail "expected pods labelled app in namespace $ns, saw none"
  fi
}

# Which reviews version answered /api/v1/products/0/reviews: v1 shows no
# ratings, v2 black stars, v3 red stars.
reviews_version() {
  case "$1" in
    *'"color":"black"'*) echo v2 ;;
    *'"color":"red"'*) echo v3 ;;
    *'"rating":'*) echo "v2/v3-without-ratings" ;;
    *'"reviews":['*) echo v1 ;;
    *) echo unrecognized ;;
  esac
}

# Polls until the command `$3...` succeeds and prints nothing, for up to
# $1 seconds; $2 says what should be gone. Fails with what it saw last.
wait_gone() {
  local timeout="$1" what="$2" seen deadline
  shift 2
  deadline=$((SECONDS + timeout))
  while true; do
    if seen="$("$@" 2>"$workdir/query.err")"; then
      [ -z "$seen" ] && return 0
    else
      seen="(the query failed: $(cat "$workdir/query.err"))"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      fail "expected no $what after uninstall (waited ${timeout}s), saw: $(echo "$seen" | tr '\n' ' ')"
    fi
    sleep 2
  done
}

# What uninstall must have removed, one a line.
mesh_system_namespace() {
  kubectl get namespace mesh-system --ignore-not-found -o name
}
mesh_crds() {
  local names
  names="$(kubectl get crd -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')" || return 1
  grep -E '[.]mesh[.]dev$' <<<"$names" || true
}
injector_webhook() {
  kubectl get mutatingwebhookconfiguration mesh-sidecar-injector --ignore-not-found -o name
}
meshctl_cluster_rbac() {
  kubectl get clusterrole,clusterrolebinding -l app.kubernetes.io/managed-by=meshctl -o name
}
root_cert_configmaps() {
  kubectl get configmap -A --field-selector metadata.name=mesh-ca-root-cert \
    -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}'
}

# ---------------------------------------------------------------------------

step "a. kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "reusing the existing cluster $CLUSTER"
  kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG"
else
  kind create cluster --name "$CLUSTER" --config e2e/kind/cluster.yaml --wait 120s
fi
kubectl cluster-info

step "b. build meshctl and the images (tag $TAG), load them into the cluster"
cargo build --release --locked -p meshctl
images_out="$(scripts/build-images.sh "$TAG")"
mapfile -t images <<<"$images_out"
if [ "${#images[@]}" -lt 9 ]; then
  fail "expected 9 images from scripts/build-images.sh, saw: ${images[*]}"
fi
to_load=("${images[@]}")
for image in "${images[@]}"; do
  case "$image" in
    */examples-*)
      # The sample manifests use :latest.
      docker tag "$image" "${image%:*}:latest"
      to_load+=("${image%:*}:latest")
      ;;
  esac
done
kind load docker-image --name "$CLUSTER" "${to_load[@]}"

step "c. meshctl install --profile demo"
"$MESHCTL" install --profile demo -y \
  --set "hub=$HUB" \
  --set "tag=$TAG" \
  --set imagePullPolicy=Never \
  --set ingressGateway.serviceType=NodePort \
  --set ingressGateway.nodePorts.http=30080
kubectl get pods -n mesh-system

step "d. automatic injection in namespace default"
kubectl label namespace default mesh-injection=enabled --overwrite

step "e. deploy bookinfo"
kubectl apply -f "$BOOKINFO/platform/bookinfo.yaml"
kubectl wait --for=condition=Available deployment --all -n default --timeout=180s

step "f. every bookinfo pod has its sidecar"
check_sidecars default

step "g. productpage through the ingress gateway"
kubectl apply -f "$BOOKINFO/networking/bookinfo-gateway.yaml"
kubectl apply -f "$BOOKINFO/networking/destination-rule-all.yaml"
# The page always has its "Book Details" heading; the details table
# (PublisherA) and "Reviews served by" show only when productpage reached
# details and reviews through the mesh.
markers=("Book Details" "PublisherA" "Reviews served by:")
deadline=$((SECONDS + 60))
while true; do
  http_get /productpage
  absent=()
  if [ "$HTTP_CODE" = 200 ]; then
    for m in "${markers[@]}"; do
      [[ "$HTTP_BODY" == *"$m"* ]] || absent+=("$m")
    done
    [ ${#absent[@]} -eq 0 ] && break
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    if [ "$HTTP_CODE" != 200 ]; then
      fail "expected HTTP 200 from $GATEWAY/productpage within 60s, saw $HTTP_CODE"
    fi
    fail "expected $GATEWAY/productpage to contain: ${markers[*]}; missing: ${absent[*]}"
  fi
  sleep 2
done
echo "productpage: 200, with details and reviews"

step "h. reviews canary: 80% v1, 20% v2"
kubectl apply -f "$BOOKINFO/networking/virtual-service-reviews-80-20.yaml"
# Until the route applies, reviews is shared by v1, v2 and v3: wait for
# 20 answers in a row without v3.
deadline=$((SECONDS + 60))
clean=0
while [ "$clean" -lt 20 ]; do
  http_get /api/v1/products/0/reviews
  version="$(reviews_version "$HTTP_BODY")"
  if [ "$HTTP_CODE" = 200 ] && { [ "$version" = v1 ] || [ "$version" = v2 ]; }; then
    clean=$((clean + 1))
  else
    clean=0
    sleep 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    fail "expected only v1 and v2 of reviews within 60s of the 80/20 VirtualService, still saw HTTP $HTTP_CODE from $version"
  fi
done
declare -A counts=()
total=200
for _ in $(seq "$total"); do
  http_get /api/v1/products/0/reviews
  if [ "$HTTP_CODE" = 200 ]; then
    version="$(reviews_version "$HTTP_BODY")"
  else
    version="http-$HTTP_CODE"
  fi
  counts[$version]=$((${counts[$version]:-0} + 1))
done
summary=""
for version in "${!counts[@]}"; do
  summary+="$version=${counts[$version]} "
done
echo "reviews versions over $total calls: $summary"
v1=${counts[v1]:-0}
v2=${counts[v2]:-0}
if [ $((v1 + v2)) -ne "$total" ]; then
  fail "expected only reviews v1 and v2 (HTTP 200), saw: $summary"
fi
if [ $((v1 * 100)) -lt $((70 * total)) ] || [ $((v1 * 100)) -gt $((90 * total)) ]; then
  fail "expected v1 to answer 70-90% of $total calls, saw $v1 ($((v1 * 100 / total))%): $summary"
fi

step "i. mesh-wide STRICT mTLS"
kubectl apply -f "$BOOKINFO/security/peer-authentication-strict.yaml"
sleep 10
codes=()
for _ in $(seq 20); do
  http_get /productpage
  codes+=("$HTTP_CODE")
done
for code in "${codes[@]}"; do
  if [ "$code" != 200 ]; then
    fail "expected 20 x HTTP 200 from $GATEWAY/productpage under STRICT mTLS, saw: ${codes[*]}"
  fi
done
echo "productpage under STRICT mTLS: 20 x 200"

step "j. meshctl kube-inject: callme in namespace manual (no injection label)"
kubectl create namespace manual --dry-run=client -o yaml | kubectl apply -f -
if [ -n "$(kubectl get namespace manual -o jsonpath='{.metadata.labels.mesh-injection}')" ]; then
  fail "expected namespace manual without the mesh-injection label, saw: $(kubectl get namespace manual --show-labels --no-headers)"
fi
# callme.yaml names namespace default; its objects go to manual instead.
sed -E 's/^([[:space:]]+namespace:)[[:space:]]*default[[:space:]]*$/\1 manual/' samples/callme/platform/callme.yaml \
  | "$MESHCTL" kube-inject --offline --proxy-image "$HUB/proxy:$TAG" -f - \
  >"$workdir/callme-injected.yaml"
if grep -Eq '^[[:space:]]+namespace:[[:space:]]*default[[:space:]]*$' "$workdir/callme-injected.yaml"; then
  fail "expected every callme object in namespace manual, saw namespace default in the injected manifest"
fi
kubectl apply -f "$workdir/callme-injected.yaml"
kubectl wait --for=condition=Available deployment --all -n manual --timeout=180s
check_sidecars manual

step "k. meshctl check"
rc=0
"$MESHCTL" check || rc=$?
if [ "$rc" -ne 0 ]; then
  fail "expected meshctl check to exit 0, it exited $rc"
fi

step "l. remove the samples, uninstall --purge, nothing left"
kubectl delete --ignore-not-found \
  -f "$BOOKINFO/security/peer-authentication-strict.yaml" \
  -f "$BOOKINFO/networking/virtual-service-reviews-80-20.yaml" \
  -f "$BOOKINFO/networking/destination-rule-all.yaml" \
  -f "$BOOKINFO/networking/bookinfo-gateway.yaml" \
  -f "$BOOKINFO/platform/bookinfo.yaml"
kubectl delete namespace manual --ignore-not-found --timeout=120s
kubectl label namespace default mesh-injection-
"$MESHCTL" uninstall -y --purge

wait_gone 120 "namespace mesh-system" mesh_system_namespace
wait_gone 60 "CustomResourceDefinitions named *.mesh.dev" mesh_crds
wait_gone 60 "MutatingWebhookConfiguration mesh-sidecar-injector" injector_webhook
wait_gone 60 "ClusterRoles or ClusterRoleBindings labelled app.kubernetes.io/managed-by=meshctl" meshctl_cluster_rbac
wait_gone 60 "ConfigMap mesh-ca-root-cert in any namespace" root_cert_configmaps
echo "nothing of the mesh is left"

printf '\nPASS\n'
