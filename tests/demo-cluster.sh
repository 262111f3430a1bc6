#!/usr/bin/env bash
# `make demo`, part two: three daemons sharing one queue in a throwaway PostgreSQL, made from the
# machine's PostgreSQL binaries (never its databases). Tasks spread over the nodes; one node is
# killed and its tasks are rescued by the others. Without the binaries it says what to install.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
on() {  # on NODE taskctl ARGS...: run on that node's home, showing it
  local node=$1; shift
  printf '[%s]$ %s\n' "$node" "$*"
  TASKCTL_HOME=${homes[$node]} "$@"
}

if ! python -c "import sys; sys.path.insert(0, '$here'); import pgcluster; sys.exit(pgcluster.server_bindir() is None)"; then
  step "several hosts, one queue: skipped"
  echo "needs the PostgreSQL server binaries (initdb, pg_ctl): apt install postgresql"
  exit 0
fi

root=$(mktemp -d /tmp/taskctl-pg.XXXXXX)  # the server's own folder (run as nobody when root)
declare -A homes
cleanup() {
  for node in "${!homes[@]}"; do
    TASKCTL_HOME=${homes[$node]} taskctl daemon stop --kill >/dev/null 2>&1 || true
    rm -rf "${homes[$node]}"
  done
  python "$here/pgcluster.py" stop "$root" >/dev/null 2>&1 || true
}
trap cleanup EXIT
export TASKCTL_NO_AUTOSTART=1

step "several hosts, one queue: three daemons on one PostgreSQL"
url=$(python "$here/pgcluster.py" start "$root")
echo "a throwaway PostgreSQL: $url"
for node in a b c; do
  homes[$node]=$(mktemp -d /tmp/taskctl-node-$node.XXXXXX)
  printf 'store = "%s"\nnode = "%s"\nlease = "3s"\nconcurrency = 2\n' "$url" "$node" > "${homes[$node]}/config.toml"
  TASKCTL_HOME=${homes[$node]} taskctl daemon start
done
on a taskctl nodes

step "30 tasks submitted on node a run all over the cluster"
ids=$(for i in $(seq 30); do echo "sleep 0.2"; done | TASKCTL_HOME=${homes[a]} taskctl submit --stdin)
echo "[a]$ for i in \$(seq 30); do echo 'sleep 0.2'; done | taskctl submit --stdin"
TASKCTL_HOME=${homes[b]} taskctl wait $ids >/dev/null 2>&1
printf '[b]$ taskctl list --json | (tasks per node)\n'
TASKCTL_HOME=${homes[b]} taskctl list --json -n 100 | python -c '
import collections, json, sys
ran = collections.Counter(t["attempts"][-1]["node"] for t in json.load(sys.stdin))
print("  ".join(f"node {n}: {k} tasks" for n, k in sorted(ran.items())))'

step "a node killed with tasks running: the others rescue them after its lease (3s)"
ids=$(for i in $(seq 6); do echo "sleep 3"; done | TASKCTL_HOME=${homes[a]} taskctl submit --stdin --retries 1)
echo "[a]$ (6 tasks of 'sleep 3', one retry each)"
for _ in $(seq 100); do
  running=$(TASKCTL_HOME=${homes[c]} taskctl list --json -s running | python -c 'import json,sys; print(sum(t["attempts"][-1]["node"] == "c" for t in json.load(sys.stdin)))')
  [ "$running" -ge 1 ] && break
  sleep 0.1
done
pid=$(TASKCTL_HOME=${homes[c]} taskctl daemon status --json | python -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
echo "kill -9 node c (daemon $pid and its supervisor), running $running of them"
for f in "${homes[c]}"/run/supervisor.*.json; do
  f=${f##*/supervisor.}; kill -9 "${f%.json}" 2>/dev/null || true
done
kill -9 "$pid"
unset 'homes[c]'
TASKCTL_HOME=${homes[a]} taskctl wait $ids >/dev/null 2>&1 || true
on a taskctl list -n 6
rescued=$(TASKCTL_HOME=${homes[a]} taskctl list --json -n 6 | python -c 'import json,sys; print(next(t["id"] for t in json.load(sys.stdin) if len(t["attempts"]) > 1))')
on a taskctl status "$rescued"
on a taskctl nodes
on b taskctl health
