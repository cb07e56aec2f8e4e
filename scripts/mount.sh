#!/usr/bin/env bash
# Start `fusesqlite mount MOUNTPOINT [options...]` in the background and wait
# until the file system answers.
#
#   scripts/mount.sh MOUNTPOINT [--store DIR | --store fdb:[/path/fdb.cluster]]
#                               [--volume NAME] [--debug]
#
# All arguments after MOUNTPOINT are passed to `fusesqlite mount` unchanged
# (so is MOUNTPOINT: a missing mount point is reported by fusesqlite itself).
#
# Environment:
#   FUSESQLITE_LOG            log file (appended to); default
#                             /var/log/fusesqlite-<basename of MOUNTPOINT>.log,
#                             or ${TMPDIR:-/tmp}/... if /var/log is not writable
#   FUSESQLITE_MOUNT_TIMEOUT  seconds to wait for the mount (default 30)
#   FUSESQLITE_STORE          default for --store (read by fusesqlite itself)
#
# On success prints the daemon's pid, the log path and how to unmount, exit 0.
# If the daemon exits before the mount answers, its error lines go to stderr
# and the exit status is non-zero; on timeout the daemon is stopped.
set -euo pipefail

if [ $# -lt 1 ] || [ -z "$1" ] || [[ "$1" == -* ]]; then
    echo "usage: $0 MOUNTPOINT [--store DIR|fdb:[CLUSTER_FILE]] [--volume NAME] [--debug]" >&2
    exit 2
fi
MP=$1
shift

ABS_MP=$(realpath -m -- "$MP")
TIMEOUT=${FUSESQLITE_MOUNT_TIMEOUT:-30}

name=$(basename -- "$ABS_MP")
[ "$name" = / ] && name=root
if [ -n "${FUSESQLITE_LOG:-}" ]; then
    LOG=$FUSESQLITE_LOG
elif [ -w /var/log ]; then
    LOG=/var/log/fusesqlite-$name.log
else
    LOG=${TMPDIR:-/tmp}/fusesqlite-$name.log
fi

# Something already mounted there would make the wait below succeed at once.
if mountpoint -q -- "$ABS_MP" 2>/dev/null; then
    echo "mount.sh: error: $ABS_MP is already a mount point (unmount it first: fusermount3 -u $ABS_MP)" >&2
    exit 1
fi

if command -v fusesqlite >/dev/null 2>&1; then
    CMD=(fusesqlite)
else
    CMD=(python3 -m fusesqlite)
fi

# Only the part of the log written by this run is inspected.
touch -- "$LOG"
printf '=== %s mount.sh: %s mount %s %s\n' "$(date -Is)" "${CMD[*]}" "$MP" "$*" >>"$LOG"
start=$(( $(stat -c %s -- "$LOG") + 1 ))
new_log() { tail -c "+$start" -- "$LOG"; }

# setsid: own session, so the daemon survives this shell and its terminal;
# nohup for good measure. setsid/nohup exec, so $! is the daemon's pid.
setsid nohup "${CMD[@]}" mount "$MP" "$@" </dev/null >>"$LOG" 2>&1 &
PID=$!

# Interrupted while waiting: do not leave a half-started daemon behind.
trap 'kill -TERM "$PID" 2>/dev/null || true; exit 130' INT TERM

deadline=$(( SECONDS + TIMEOUT ))
while :; do
    if ! kill -0 "$PID" 2>/dev/null; then
        rc=0; wait "$PID" || rc=$?
        [ "$rc" -ne 0 ] || rc=1      # exited "successfully" without staying mounted
        echo "mount.sh: fusesqlite exited (status $rc) before $ABS_MP was mounted; log: $LOG" >&2
        if new_log | grep -q 'fusesqlite: error:'; then
            new_log | grep 'fusesqlite: error:' >&2
        else
            new_log | tail -n 20 >&2
        fi
        exit "$rc"
    fi
    # timeout: a mount whose daemon does not answer would block stat forever.
    if timeout 5 mountpoint -q -- "$ABS_MP" 2>/dev/null; then
        break
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "mount.sh: error: $ABS_MP not mounted after ${TIMEOUT}s; stopping pid $PID; log: $LOG" >&2
        kill -TERM "$PID" 2>/dev/null || true
        new_log | tail -n 20 >&2
        exit 1
    fi
    sleep 0.2
done
trap - INT TERM

echo "fusesqlite: mounted $ABS_MP"
echo "  pid:      $PID"
echo "  log:      $LOG"
echo "  unmount:  kill $PID    (or: fusermount3 -u $ABS_MP, busy while another mount writes)"
