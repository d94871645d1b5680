#!/bin/bash
# stop.sh DIR -- stops the nsd and unbound instances (and the watchdog)
# that start.sh DIR started, by the process ids it recorded. Idempotent.
set -uo pipefail
dir=${1:?usage: stop.sh DIR}
[ -d "$dir" ] || exit 0
alive() {  # a zombie (reaped late by init) counts as gone
    kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1")" != Z* ]]
}
for name in watchdog unbound nsd; do
    f=$dir/$name.pid
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    # The watchdog runs this script itself (exec): do not kill ourselves.
    if [ -n "$pid" ] && [ "$pid" != "$$" ]; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$f"
done
exit 0
