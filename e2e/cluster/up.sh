#!/usr/bin/env bash
# Starts the e2e test cluster on this machine: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler built unmodified from the Go
# modules in go.mod (build.sh), and mesh-node, the node agent that plays the
# kubelet for two nodes. See e2e/cluster/README.md.
#
#   e2e/cluster/up.sh [--control-plane-only]
#
# Environment: MESH_CLUSTER_STATE (state directory, default
# target/cluster/state), MESH_CLUSTER_SKIP_CARGO=1 (don't build the Rust
# binaries), MESH_NODE_BIN (the node agent's binary), MESH_CLUSTER_LINK_TYPE
# (the kind of the host link, default dummy, else ifb where the kernel has no
# dummy driver).
#
# Needs root: it adds a network interface and routes, sets ip_forward, and
# the node agent makes network namespaces. Stop it with e2e/cluster/down.sh.
set -euo pipefail
set -E
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
t0="$(date +%s%N)"

usage() { sed -n '2,16s/^# \{0,1\}//p' "$0"; }
control_plane_only=0
for arg in "$@"; do
  case "$arg" in
    --control-plane-only) control_plane_only=1 ;;
    -h | --help) usage; exit 0 ;;
    *) warn "unknown argument: $arg"; usage >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  warn "up.sh must run as root: it creates the $link interface and routes for $pod_cidr and $service_cidr, sets net.ipv4.ip_forward, and the node agent creates network namespaces and veths"
  exit 1
fi
for tool in openssl curl ip ss setsid base64; do
  command -v "$tool" >/dev/null || { warn "$tool is not installed"; exit 1; }
done

# Refuse a second cluster from the same state directory.
for c in "${components[@]}"; do
  running="$(component_pid "$c" || true) $(component_strays "$c" | tr '\n' ' ')"
  running="$(echo "$running" | xargs -n1 2>/dev/null | sort -u | xargs)"
  if [ -n "$running" ]; then
    warn "a cluster from $state is already running ($c, pid $running); run e2e/cluster/down.sh first"
    exit 1
  fi
done

# Ports another program holds make a component fail later with less clarity.
ports=(23790 23800 6443 10257 10259)
[ "$control_plane_only" = 1 ] || ports+=(10250)
for port in "${ports[@]}"; do
  holder="$(ss -Hltnp "sport = :$port" 2>/dev/null || true)"
  if [ -n "$holder" ]; then
    warn "TCP port $port, which the cluster needs, is in use: $holder"
    exit 1
  fi
done

trap 'rc=$?; warn "failed (exit $rc) at line $LINENO: $BASH_COMMAND"; warn "state is left in $state; e2e/cluster/down.sh cleans up"' ERR

# ---- 1. binaries -----------------------------------------------------------
bash "$here/build.sh"
if [ "${MESH_CLUSTER_SKIP_CARGO:-0}" != 1 ]; then
  say "cargo build (debug) of mesh-node, mesh-proxy, mesh-pilot, mesh-injector, mesh-samples"
  (cd "$root" && cargo build --locked -p mesh-node -p mesh-proxy -p mesh-pilot -p mesh-injector -p mesh-samples)
fi
if [ "$control_plane_only" = 0 ] && [ ! -x "$node_bin" ]; then
  warn "the node agent $node_bin does not exist (build it, set MESH_NODE_BIN, or pass --control-plane-only)"
  exit 1
fi

# ---- 2. state directory ----------------------------------------------------
mkdir -p "$state" "$pki" "$logs" "$pids" "$state/node"
chmod 700 "$state" "$pki"
# down.sh removes only a directory carrying this marker.
touch "$state/.mesh-cluster-state"

# ---- 3. PKI ----------------------------------------------------------------
reqcnf="$pki/.req.cnf"
printf '[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n' >"$reqcnf"

new_key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
  chmod 600 "$1"
}

# new_ca NAME CN: a self-signed CA, NAME.crt and NAME.key, if missing.
new_ca() {
  local name="$1" cn="$2" ext="$pki/.$1.ext"
  [ -s "$pki/$name.crt" ] && [ -s "$pki/$name.key" ] && return 0
  say "pki: $name (CN=$cn)"
  new_key "$pki/$name.key"
  openssl req -new -config "$reqcnf" -key "$pki/$name.key" -subj "/CN=$cn" -out "$pki/.$name.csr"
  printf '[v3]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign, digitalSignature\nsubjectKeyIdentifier = hash\n' >"$ext"
  openssl x509 -req -in "$pki/.$name.csr" -signkey "$pki/$name.key" -days 3650 -sha256 \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$ext" -extensions v3 -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/.$name.csr" "$ext"
}

# new_cert NAME CA SUBJECT USAGE [SAN]: NAME.crt/NAME.key signed by CA, if
# missing or no longer signed by it. USAGE is clientAuth or serverAuth.
new_cert() {
  local name="$1" ca="$2" subj="$3" usage="$4" san="${5:-}" ext="$pki/.$1.ext"
  if [ -s "$pki/$name.crt" ] && [ -s "$pki/$name.key" ] &&
    openssl verify -CAfile "$pki/$ca.crt" "$pki/$name.crt" >/dev/null 2>&1; then
    return 0
  fi
  say "pki: $name ($subj)"
  new_key "$pki/$name.key"
  openssl req -new -config "$reqcnf" -key "$pki/$name.key" -subj "$subj" -out "$pki/.$name.csr"
  {
    printf '[v3]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n'
    printf 'extendedKeyUsage = %s\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n' "$usage"
    if [ -n "$san" ]; then printf 'subjectAltName = %s\n' "$san"; fi
  } >"$ext"
  openssl x509 -req -in "$pki/.$name.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -days 825 -sha256 \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$ext" -extensions v3 -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/.$name.csr" "$ext"
}

new_ca ca mesh-cluster-ca
new_cert apiserver ca "/CN=kube-apiserver" serverAuth \
  "IP:127.0.0.1, IP:10.247.0.1, IP:10.248.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local"
new_cert admin ca "/O=system:masters/CN=kubernetes-admin" clientAuth
new_cert kube-controller-manager ca "/CN=system:kube-controller-manager" clientAuth
new_cert kube-scheduler ca "/CN=system:kube-scheduler" clientAuth
new_cert mesh-node ca "/O=system:masters/CN=mesh-node" clientAuth
new_cert apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
new_ca front-proxy-ca front-proxy-ca
new_cert front-proxy-client front-proxy-ca "/CN=front-proxy-client" clientAuth
if [ ! -s "$pki/sa.key" ] || [ ! -s "$pki/sa.pub" ]; then
  say "pki: service-account key pair (RSA 2048)"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
  chmod 600 "$pki/sa.key"
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
fi
rm -f "$reqcnf"

# write_kubeconfig FILE USER CERT: a kubeconfig for the API server with the
# CA and the client certificate and key embedded; context mesh-cluster.
write_kubeconfig() {
  local file="$1" user="$2" cert="$3"
  : >"$file"
  chmod 600 "$file"
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mesh-cluster
  cluster:
    server: $apiserver_url
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$pki/$cert.crt")
    client-key-data: $(base64 -w0 "$pki/$cert.key")
contexts:
- name: mesh-cluster
  context:
    cluster: mesh-cluster
    user: $user
current-context: mesh-cluster
EOF
}
write_kubeconfig "$state/admin.kubeconfig" kubernetes-admin admin
write_kubeconfig "$state/controller-manager.kubeconfig" system:kube-controller-manager kube-controller-manager
write_kubeconfig "$state/scheduler.kubeconfig" system:kube-scheduler kube-scheduler
write_kubeconfig "$state/node.kubeconfig" mesh-node mesh-node

# ---- 4. host network -------------------------------------------------------
if ! ip link show dev "$link" >/dev/null 2>&1; then
  kind="${MESH_CLUSTER_LINK_TYPE:-}"
  if [ -n "$kind" ]; then
    ip link add "$link" type "$kind"
  elif ! ip link add "$link" type dummy 2>/dev/null; then
    # No dummy driver in this kernel: an ifb link behaves the same here
    # (NOARP, and it drops whatever is routed to it).
    kind=ifb
    say "network: this kernel has no dummy links; $link is an ifb link instead"
    ip link add "$link" type ifb
  fi
fi
ip link set dev "$link" up
for a in "${node_ips[@]}"; do ip addr replace "$a/32" dev "$link"; done
ip route replace "$pod_cidr" dev "$link"
ip route replace "$service_cidr" dev "$link"
[ -s "$state/ip_forward" ] || cat /proc/sys/net/ipv4/ip_forward >"$state/ip_forward"
echo 1 >/proc/sys/net/ipv4/ip_forward
say "network: $link up with ${node_ips[*]}; $pod_cidr and $service_cidr routed to it; ip_forward=1 (was $(cat "$state/ip_forward"))"

# ---- 5. components ---------------------------------------------------------
# True while a process exists and is not a zombie.
alive() {
  local s
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
  s="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" || return 1
  [ "$s" != Z ] && [ "$s" != X ]
}

die_component() {
  trap - ERR
  warn "$1 $2"
  log_tail "$1"
  warn "state is left in $state; e2e/cluster/down.sh cleans up"
  exit 1
}

# start NAME ARGS...: runs the component in its own session.
start() {
  local name="$1" exe
  shift
  exe="$(component_bin "$name")"
  : >"$logs/$name.log"
  setsid "$exe" "$@" </dev/null >>"$logs/$name.log" 2>&1 &
  echo $! >"$pids/$name.pid"
  say "started $name (pid $!), log $logs/$name.log"
}

# wait_until NAME SECONDS WHAT CMD...: polls CMD every half second until it
# succeeds; NAME exiting or the time running out ends up.sh.
wait_until() {
  local name="$1" secs="$2" what="$3" deadline pid
  shift 3
  deadline=$(($(date +%s) + secs))
  pid="$(cat "$pids/$name.pid")"
  until "$@" >/dev/null 2>&1; do
    alive "$pid" || die_component "$name" "exited (pid $pid) while up.sh waited for $what"
    [ "$(date +%s)" -lt "$deadline" ] || die_component "$name" "is running, but up.sh timed out after $secs s waiting for $what"
    sleep 0.5
  done
}

kubectl() { "$bin/kubectl" --kubeconfig "$state/admin.kubeconfig" "$@"; }
kc() { kubectl --request-timeout=5s "$@"; }
healthy() { curl -fsS --max-time 3 "$@"; }
api_get() { healthy --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$apiserver_url$1"; }

start etcd \
  --name default \
  --data-dir "$state/etcd" \
  --listen-client-urls "$etcd_url" \
  --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "$etcd_peer_url" \
  --initial-advertise-peer-urls "$etcd_peer_url" \
  --initial-cluster "default=$etcd_peer_url" \
  --initial-cluster-state new \
  --initial-cluster-token mesh-cluster
wait_until etcd 30 "health ($etcd_url/health)" healthy "$etcd_url/health"
say "etcd healthy"

admission=NamespaceLifecycle,LimitRanger,ServiceAccount,TaintNodesByCondition,PodSecurity,Priority
admission+=,DefaultTolerationSeconds,DefaultStorageClass,StorageObjectInUseProtection,PodGroupProtection
admission+=,PersistentVolumeClaimResize,RuntimeClass,CertificateApproval,CertificateSigning
admission+=,ClusterTrustBundleAttest,CertificateSubjectRestriction,DefaultIngressClass,PodTopologyLabels
admission+=,NodeDeclaredFeatureValidator,PodResizeValidator,MutatingAdmissionPolicy,MutatingAdmissionWebhook
admission+=,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook,ResourceQuota
start kube-apiserver \
  --bind-address "$apiserver_ip" \
  --advertise-address "$apiserver_ip" \
  --secure-port 6443 \
  --etcd-servers "$etcd_url" \
  --service-cluster-ip-range "$service_cidr" \
  --service-node-port-range 30000-32767 \
  --client-ca-file "$pki/ca.crt" \
  --tls-cert-file "$pki/apiserver.crt" \
  --tls-private-key-file "$pki/apiserver.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" \
  --service-account-signing-key-file "$pki/sa.key" \
  --authorization-mode RBAC \
  --enable-admission-plugins "$admission" \
  --allow-privileged=true \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority "$pki/ca.crt" \
  --kubelet-preferred-address-types InternalIP,Hostname \
  --proxy-client-cert-file "$pki/front-proxy-client.crt" \
  --proxy-client-key-file "$pki/front-proxy-client.key" \
  --requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
  --requestheader-allowed-names front-proxy-client \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --requestheader-group-headers X-Remote-Group \
  --requestheader-username-headers X-Remote-User \
  --profiling=false
wait_until kube-apiserver 60 "readiness ($apiserver_url/readyz)" api_get /readyz
say "kube-apiserver ready"

start kube-controller-manager \
  --kubeconfig "$state/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$state/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$state/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 \
  --service-account-private-key-file "$pki/sa.key" \
  --root-ca-file "$pki/ca.crt" \
  --cluster-signing-cert-file "$pki/ca.crt" \
  --cluster-signing-key-file "$pki/ca.key" \
  --use-service-account-credentials \
  --controllers '*' \
  --leader-elect=false \
  --allocate-node-cidrs=false \
  --cluster-cidr "$pod_cidr" \
  --service-cluster-ip-range "$service_cidr" \
  --flex-volume-plugin-dir "$state/flexvolume" \
  --profiling=false
start kube-scheduler \
  --kubeconfig "$state/scheduler.kubeconfig" \
  --authentication-kubeconfig "$state/scheduler.kubeconfig" \
  --authorization-kubeconfig "$state/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 \
  --leader-elect=false \
  --profiling=false
# Their serving certificates are self-signed, hence -k; /healthz needs no
# credentials (--authorization-always-allow-paths).
wait_until kube-controller-manager 30 "health (https://127.0.0.1:10257/healthz)" healthy -k https://127.0.0.1:10257/healthz
wait_until kube-scheduler 30 "health (https://127.0.0.1:10259/healthz)" healthy -k https://127.0.0.1:10259/healthz
say "kube-controller-manager and kube-scheduler healthy"

if [ "$control_plane_only" = 0 ]; then
  node_args=(
    run
    --kubeconfig "$state/node.kubeconfig"
    --state-dir "$state/node"
    --bin-dir "$cargo_bin"
    --node node-1=10.247.0.1=10.247.1.0/24
    --node node-2=10.247.0.2=10.247.2.0/24
    --pod-cidr "$pod_cidr"
    --service-cidr "$service_cidr"
    --dns 10.247.0.1:53
    --cluster-domain cluster.local
  )
  say "mesh-node: $node_bin ${node_args[*]}"
  start mesh-node "${node_args[@]}"
fi

# ---- 6. the cluster is usable ----------------------------------------------
if [ "$control_plane_only" = 0 ]; then
  wait_until mesh-node 60 "nodes node-1 and node-2 to be registered" kc get node node-1 node-2
  if ! kubectl wait --for=condition=Ready node --all --timeout=90s >/dev/null 2>"$state/.wait.err"; then
    cat "$state/.wait.err" >&2
    kc get nodes -o wide >&2 || true
    die_component mesh-node "registered the nodes but they are not all Ready after 90 s"
  fi
  rm -f "$state/.wait.err"
fi
# The controller-manager's serviceaccount controller creates it; pods in
# namespace default can't be admitted without it.
wait_until kube-controller-manager 60 "ServiceAccount default/default (made by its serviceaccount controller)" kc -n default get serviceaccount default
for c in "${components[@]}"; do
  [ "$c" = mesh-node ] && [ "$control_plane_only" = 1 ] && continue
  alive "$(cat "$pids/$c.pid")" || die_component "$c" "exited after it became healthy"
done
trap - ERR

if [ "$control_plane_only" = 0 ]; then kc get nodes -o wide; fi
ms=$((($(date +%s%N) - t0) / 1000000))
say "cluster up in $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s$([ "$control_plane_only" = 1 ] && echo ' (control plane only)'); logs in $logs; stop it with e2e/cluster/down.sh"
echo "export KUBECONFIG=$state/admin.kubeconfig"
