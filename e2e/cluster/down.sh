#!/usr/bin/env bash
# Stops the e2e test cluster that up.sh started and undoes what it did to the
# host. Safe to run when nothing runs.
#
#   e2e/cluster/down.sh [--keep-state]
#
# Stops mesh-node (SIGTERM, up to 30 s to stop its pods, then SIGKILL), then
# kube-scheduler, kube-controller-manager, kube-apiserver and etcd (SIGTERM,
# 10 s, SIGKILL); runs `mesh-node cleanup` for whatever a killed agent left;
# deletes the meshk8s0 link (and its routes); restores net.ipv4.ip_forward;
# removes the state directory, or with --keep-state keeps it (logs, PKI,
# etcd data) for the next up.sh.
#
# Environment: MESH_CLUSTER_STATE and MESH_NODE_BIN as for up.sh. Needs root.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

keep_state=0
for arg in "$@"; do
  case "$arg" in
    --keep-state) keep_state=1 ;;
    -h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) warn "unknown argument: $arg"; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  warn "down.sh must run as root: it stops root's processes, deletes the $link interface and restores net.ipv4.ip_forward"
  exit 1
fi

gone() {
  local p
  for p in "$@"; do
    kill -0 "$p" 2>/dev/null && [ "$(awk '{ print $3 }' "/proc/$p/stat" 2>/dev/null)" != Z ] && return 1
  done
  return 0
}

# stop NAME GRACE: SIGTERM, GRACE seconds, SIGKILL, for the component's pid
# file and any process of its binary that names this state directory.
stop() {
  local name="$1" grace="$2" list deadline
  list="$( (component_pid "$name" || true; component_strays "$name") | sort -u | xargs)"
  rm -f "$pids/$name.pid"
  [ -n "$list" ] || return 0
  say "stopping $name (pid $list)"
  # shellcheck disable=SC2086
  kill -TERM $list 2>/dev/null || true
  deadline=$(($(date +%s) + grace))
  # shellcheck disable=SC2086
  while ! gone $list && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
  # shellcheck disable=SC2086
  if ! gone $list; then
    warn "$name did not stop within $grace s; SIGKILL"
    kill -KILL $list 2>/dev/null || true
    deadline=$(($(date +%s) + 5))
    while ! gone $list && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
    gone $list || warn "$name (pid $list) still there after SIGKILL"
  fi
}

stop mesh-node 30
stop kube-scheduler 10
stop kube-controller-manager 10
stop kube-apiserver 10
stop etcd 10

# A node agent that was killed (or crashed) leaves pods, namespaces, veths
# and iptables chains behind; its cleanup removes them.
if [ -x "$node_bin" ]; then
  say "mesh-node cleanup --state-dir $state/node"
  timeout 60 "$node_bin" cleanup --state-dir "$state/node" ||
    warn "mesh-node cleanup failed (exit $?); continuing"
fi

if ip link show dev "$link" >/dev/null 2>&1; then
  say "deleting $link (its addresses and routes go with it)"
  ip link del dev "$link"
fi

if [ -s "$state/ip_forward" ]; then
  v="$(cat "$state/ip_forward")"
  case "$v" in
    0 | 1)
      echo "$v" >/proc/sys/net/ipv4/ip_forward
      say "net.ipv4.ip_forward restored to $v"
      ;;
    *) warn "ignoring $state/ip_forward: '$v' is not 0 or 1" ;;
  esac
  rm -f "$state/ip_forward"
fi

left=()
for c in "${components[@]}"; do
  for p in $(component_strays "$c"); do left+=("$c:$p"); done
done
[ ${#left[@]} -eq 0 ] || warn "still running: ${left[*]}"

if [ -d "$state" ]; then
  if [ "$keep_state" = 1 ]; then
    rm -rf "$pids"
    say "kept $state (logs in $logs)"
  elif [ -e "$state/.mesh-cluster-state" ]; then
    rm -rf "$state"
    say "removed $state"
  else
    warn "not removing $state: it has no .mesh-cluster-state marker, so up.sh did not make it"
  fi
fi
say "cluster down"
[ ${#left[@]} -eq 0 ]
