#!/usr/bin/env bash
# Stop the single-node Ray started by cluster/local/start.sh, and only that one.
#
# Usage: cluster/local/stop.sh        (IMGCLS_RAY_PORT: the GCS port given to start.sh, default 6379)
#
# The cluster is found by its GCS port: the GCS process names the session folder (read with `ps -ww`:
# an exported COLUMNS would otherwise cut the command line short), and every process
# of that cluster names the session folder or the GCS address; those processes and their children
# (workers, job drivers) get SIGTERM in `ray stop`'s order (raylet, the rest, GCS), SIGKILL after 10 s.
# Other Ray instances on the machine (a job's private `ray.init()`, a test suite's Ray) keep running;
# `ray stop` would stop every Ray process on the machine that it may signal.
set -euo pipefail
gcs_port="${IMGCLS_RAY_PORT:-6379}"

escape() { printf '%s' "$1" | sed 's/[][\.*^$()+?{}|]/\\&/g'; }

gcs_pid="$(pgrep -f -- "gcs_server .*--gcs_server_port=${gcs_port}( |\$)" | head -n 1 || true)"
if [ -z "$gcs_pid" ]; then
    echo "No Ray with GCS port ${gcs_port} is running here."
    exit 0
fi
session_dir="$(ps -ww -o args= -p "$gcs_pid" | sed -n 's/.*--session-dir=\([^ ]*\).*/\1/p')"
[ -n "$session_dir" ] || { echo "Cannot find the session folder of GCS process ${gcs_pid}." >&2; exit 1; }

descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do
        echo "$child"
        descendants "$child"
    done
}

members=()
for pid in $(pgrep -f -- "$(escape "$session_dir")" || true) \
           $(pgrep -f -- "--(gcs-)?address=[^ ]*:${gcs_port}( |\$)" || true); do
    members+=("$pid" $(descendants "$pid"))
done
members=($(printf '%s\n' "${members[@]}" | grep -vx -e "$$" -e "$PPID" | sort -un || true))

alive() {  # the given processes that have not exited (a zombie has; it waits for its parent)
    local pid
    for pid in "$@"; do
        case "$(ps -o stat= -p "$pid" 2>/dev/null || true)" in "" | Z*) ;; *) echo "$pid" ;; esac
    done
}
stop_group() {  # SIGTERM, up to 10 s to exit, then SIGKILL
    local group=($(alive "$@"))
    [ "${#group[@]}" -gt 0 ] || return 0
    kill -TERM "${group[@]}" 2>/dev/null || true
    for _ in $(seq 1 20); do
        group=($(alive "${group[@]}"))
        [ "${#group[@]}" -gt 0 ] || return 0
        sleep 0.5
    done
    kill -KILL "${group[@]}" 2>/dev/null || true
}

echo "Stopping the Ray of session ${session_dir} (${#members[@]} processes)."
# In Ray's own order (as `ray stop`): the raylet first (it ends its workers and agents), then the
# rest, the GCS last; all at once leaves the raylet and the GCS waiting for each other.
raylets=()
others=()
for pid in "${members[@]}"; do
    if [ "$pid" = "$gcs_pid" ]; then
        continue
    elif [ "$(ps -o comm= -p "$pid" 2>/dev/null || true)" = "raylet" ]; then
        raylets+=("$pid")
    else
        others+=("$pid")
    fi
done
stop_group "${raylets[@]}"
stop_group "${others[@]}"
stop_group "$gcs_pid"
echo "Stopped. Its logs stay in ${session_dir}/logs."
