#!/usr/bin/env bash
# `make demo`: a short, real scenario against a real daemon in a throwaway home.
# Each capability adds its part. Exits non-zero if anything does not behave as shown.
set -euo pipefail

home=$(mktemp -d /tmp/taskctl-demo.XXXXXX)
export TASKCTL_HOME=$home TASKCTL_NO_AUTOSTART=1
cleanup() { taskctl daemon stop >/dev/null 2>&1 || true; rm -rf "$home"; }
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
typed() {  # the command as it would be typed
  printf '$'
  for word in "$@"; do
    if [[ "$word" =~ [^A-Za-z0-9_./=:,@%+-] ]]; then printf " '%s'" "$word"; else printf ' %s' "$word"; fi
  done
  printf '\n'
}
show() { typed "$@"; "$@"; }  # print the command, then run it
submitted() {  # show a submit and its output (the new task's id), and keep the id in $id
  typed "$@"
  id=$("$@")
  echo "$id"
}

step "start the daemon (in $home)"
show taskctl daemon start

step "a task that succeeds"
submitted taskctl submit -n hello -- sh -c 'echo "hello from task $TASKCTL_TASK_ID"'
ok=$id
show taskctl wait "$ok"
show taskctl logs "$ok"

step "a task that fails, then succeeds on its retry"
submitted taskctl submit -n flaky --retries 2 --retry-delay 500ms -C "$home" --shell -- \
  'n=$(cat attempts 2>/dev/null || echo 0); echo $((n+1)) > attempts; echo "attempt $((n+1))"; [ "$n" -ge 1 ]'
flaky=$id
show taskctl wait "$flaky"
show taskctl status "$flaky"

step "a failure keeps its exit code and its stderr"
submitted taskctl submit -n broken -- sh -c 'echo "disk on fire" >&2; exit 3'
bad=$id
typed taskctl wait "$bad"
taskctl wait "$bad" && { echo "expected exit 3"; exit 1; } || code=$?
echo "(exit code $code: the task's own)"
show taskctl logs --stderr "$bad"

step "a cron schedule (like a crontab line, with retries and a timeout)"
show taskctl cron add -n heartbeat --retries 2 --timeout 30s '*/5 * * * *' -- sh -c 'date >> "$TASKCTL_HOME/heartbeat.log"'
show taskctl cron next heartbeat -n 3
show taskctl cron list

step "a file trigger: a burst of changes becomes one task"
mkdir -p "$home/inbox"
show taskctl trigger add -n inbox "$home/inbox" --debounce 300ms -- sh -c 'wc -l < "$TASKCTL_CHANGED_PATHS"'
sleep 0.3
touch "$home/inbox/a" "$home/inbox/b" "$home/inbox/c"
for _ in $(seq 100); do
  fired=$(taskctl list --json | python3 -c 'import json,sys; print(next((t["id"] for t in json.load(sys.stdin) if t.get("schedule") == "inbox"), ""))')
  [ -n "$fired" ] && break
  sleep 0.1
done
show taskctl wait "$fired"
printf 'changed paths seen by task %s: ' "$fired"; taskctl logs "$fired"

step "a queue with a limit of its own; a typo in a queue's name is refused, not a new queue"
show taskctl queue set gpu --concurrency 1
submitted taskctl submit -q gpu -n train -- true
show taskctl wait "$id"
typed taskctl submit -q gpuu -- true
taskctl submit -q gpuu -- true && { echo "expected a refusal"; exit 1; } || code=$?
echo "(exit code $code: nothing was created)"
show taskctl queue list

step "nothing a task starts outlives it, and bytes are bytes"
long="300.$$"  # a duration no other process here sleeps for
submitted taskctl submit -n escapee --timeout 1s --kill-grace 200ms -- sh -c "setsid -f sleep $long; sleep $long"
typed taskctl wait "$id"
taskctl wait "$id" && { echo "expected a timeout"; exit 1; } || code=$?
echo "(exit code $code: it timed out)"
if pgrep -f "^sleep $long\$" >/dev/null; then echo "a descendant outlived its task"; exit 1; fi
taskctl daemon status | grep containment
odd=$(printf 'caf\xe9')  # Latin-1, not UTF-8: a name a shell user may well have
submitted taskctl submit -n latin1 -- printf '%s' "$odd"
show taskctl wait "$id"
[ "$(taskctl logs --raw "$id")" = "$odd" ] && echo "(the task printed the exact bytes it was given)"
show taskctl status "$id"

step "everything, as people and as scripts see it"
show taskctl list
printf '$ taskctl list --json | python3 -c ...\n'
taskctl list --json | python3 -c 'import json,sys; print({t["name"]: t["state"] for t in json.load(sys.stdin)})'

step "health"
show taskctl health

step "stop the daemon"
show taskctl daemon stop

# Several hosts, one queue: three daemons on a throwaway PostgreSQL (where its binaries are).
bash "$(dirname "$0")/demo-cluster.sh"
