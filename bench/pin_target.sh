#!/bin/bash
# Emulate a target on hardware of its own on one machine: pin every thread of the running Ray
# Serve Target replicas to the cores in $1 and every other Ray process (drafters, coordinators,
# proxy, controller, raylet, ...) to the cores in $2.  Run it after the service answered (replica
# processes exist), and run the bench client on $2 too (taskset -c $2 hsd-serve bench ...).
#   bench/pin_target.sh 0 1
set -euo pipefail
target_cores=${1:?target cores, e.g. 0}
other_cores=${2:?cores for everything else, e.g. 1}
pinned=0
for pid in $(pgrep -f "^ray::|raylet|gcs_server|dashboard" || true); do
  if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "ServeReplica:[^ ]*:Target"; then
    taskset -a -p -c "$target_cores" "$pid" > /dev/null
    echo "target replica $pid -> cores $target_cores"
    pinned=$((pinned + 1))
  else
    taskset -a -p -c "$other_cores" "$pid" > /dev/null 2>&1 || true
  fi
done
if [ "$pinned" = 0 ]; then echo "no Target replica process found (is the service up?)" >&2; exit 1; fi
