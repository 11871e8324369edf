# Shared by up.sh and down.sh: paths, addresses and process helpers of the
# e2e test cluster. Sourced, not run.

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="$root/target/cluster/bin"
cargo_bin="${CARGO_TARGET_DIR:-$root/target}/debug"
[ "${cargo_bin#/}" = "$cargo_bin" ] && cargo_bin="$root/$cargo_bin"
node_bin="${MESH_NODE_BIN:-$cargo_bin/mesh-node}"
state="${MESH_CLUSTER_STATE:-$root/target/cluster/state}"
[ "${state#/}" = "$state" ] && state="$(pwd)/$state"
pki="$state/pki"
logs="$state/logs"
pids="$state/pids"

# The host side of the cluster's network: a link that owns the nodes'
# addresses and swallows traffic to pod and service addresses nobody claims.
link=meshk8s0
node_ips=(10.247.0.1 10.247.0.2)
pod_cidr=10.247.0.0/16
service_cidr=10.248.0.0/16
apiserver_ip=10.247.0.1
apiserver_url="https://$apiserver_ip:6443"
etcd_url=http://127.0.0.1:23790
etcd_peer_url=http://127.0.0.1:23800

# Start order; down.sh stops them in reverse.
components=(etcd kube-apiserver kube-controller-manager kube-scheduler mesh-node)

say() { echo "e2e/cluster: $*"; }
warn() { echo "e2e/cluster: $*" >&2; }

# The executable a component runs.
component_bin() {
  case "$1" in
    mesh-node) echo "$node_bin" ;;
    *) echo "$bin/$1" ;;
  esac
}

# proc_runs DIR EXE: true if the process /proc/<pid> (DIR) runs EXE, directly
# or, for a script (MESH_NODE_BIN may be one), as its interpreter's first
# argument. Sets proc_args to its command line. No forks: it runs for every
# process on the machine.
proc_runs() {
  proc_args=()
  mapfile -d '' proc_args <"$1/cmdline" 2>/dev/null || return 1
  [ ${#proc_args[@]} -gt 0 ] || return 1
  [ "$1/exe" -ef "$2" ] || [ "${proc_args[0]}" = "$2" ] || [ "${proc_args[1]:-}" = "$2" ]
}

# True if $1 is a live process running the executable $2 (so a stale pid
# file whose number was reused by something else never counts).
pid_is() {
  [[ "$1" =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null && proc_runs "/proc/$1" "$2"
}

# The live pid of a component from its pid file, or nothing.
component_pid() {
  local f="$pids/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f" 2>/dev/null)"
  pid_is "$pid" "$(component_bin "$1")" && echo "$pid"
}

# Live processes of a component's executable whose command line names this
# state directory: what a lost pid file would have pointed at.
component_strays() {
  local exe p
  exe="$(component_bin "$1")"
  [ -e "$exe" ] || return 0
  for p in /proc/[0-9]*; do
    proc_runs "$p" "$exe" || continue
    [[ "${proc_args[*]}" == *"$state/"* ]] || continue
    echo "${p#/proc/}"
  done
}

log_tail() {
  local f="$logs/$1.log"
  if [ -s "$f" ]; then
    echo "---- last 30 lines of $f ----" >&2
    tail -n 30 "$f" >&2
    echo "----" >&2
  else
    echo "(no output in $f)" >&2
  fi
}
