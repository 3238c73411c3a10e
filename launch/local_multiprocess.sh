#!/usr/bin/env bash
# Runs a command as N cooperating JAX processes on this machine, on CPU: what a multi-host
# run does, without the hosts. Each process gets D CPU devices and the MMFUSION_* variables
# that mmfusion.distributed.initialize() reads; the processes talk over localhost (gloo).
#
#   launch/local_multiprocess.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] -- COMMAND...
#
#   launch/local_multiprocess.sh -n 2 -d 2 -- \
#     python -m mmfusion.main --config configs/shapes_clip.py --workdir workdirs/mp
#
# -n processes (default 2), -d CPU devices per process (default 2), -p coordinator port
# (default: a free one). Output lines are prefixed with `[p<i>] `. If a process fails, the
# others are stopped (SIGTERM, then SIGKILL after $MMFUSION_LAUNCH_GRACE s, default 30) and
# the script exits with the first failing code. Ctrl-C / SIGTERM reach every process once:
# the trainer saves a checkpoint and stops, and re-running the same command resumes.
# A second Ctrl-C is passed on too (the trainer then stops at once). Needs bash >= 4.3.
set -euo pipefail

usage() {
  echo "usage: $0 [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] -- COMMAND..." >&2
  exit 2
}

num_processes=2
devices=2
port=''
while getopts 'n:d:p:h' opt; do
  case "$opt" in
    n) num_processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == '--' ]] && shift
if (( $# == 0 )); then
  echo "local_multiprocess.sh: no command given (put it after --)" >&2
  usage
fi
for value in "$num_processes" "$devices" ${port:+"$port"}; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "local_multiprocess.sh: expected a positive integer, got '$value'" >&2
    usage
  fi
done

if [[ -z "$port" ]]; then
  # Bind port 0 and let the kernel choose; process 0 binds it again a moment later.
  python="$(command -v python3 || command -v python)"
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
export MMFUSION_COORDINATOR_ADDRESS="localhost:$port"
export MMFUSION_NUM_PROCESSES="$num_processes"
export PYTHONUNBUFFERED=1   # lines out as they are printed, not when a buffer fills

# Copies stdin to stdout with a label before each line. Ignores INT/TERM, so that the lines
# a process prints while it stops (its checkpoint) still come through.
prefix() {
  trap '' INT TERM
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '%s%s\n' "$1" "$line"
  done
}

declare -A running=()   # process number -> pid, while it runs
interrupted=0
forward() {
  interrupted=1
  echo "[launch] $1: passing it on to ${#running[@]} process(es)" >&2
  kill -s "$1" "${running[@]}" 2>/dev/null || true
}
trap 'forward INT' INT
trap 'forward TERM' TERM

# Job control: each process in its own process group, so a terminal's Ctrl-C reaches only
# this script, which passes it on exactly once (a second signal stops the trainer at once,
# without its checkpoint).
set -m
for (( i = 0; i < num_processes && !interrupted; i++ )); do
  MMFUSION_PROCESS_ID="$i" "$@" < /dev/null > >(prefix "[p$i] ") 2>&1 &
  running[$i]=$!
done

status=0
killer=''
while (( ${#running[@]} )); do
  wait -n 2>/dev/null || true   # returns when a process ends, or a signal arrives
  for i in "${!running[@]}"; do
    pid="${running[$i]}"
    kill -0 "$pid" 2>/dev/null && continue
    code=0
    wait "$pid" || code=$?
    unset 'running[$i]'
    if (( code != 0 && status == 0 )); then
      status=$code
      # After a Ctrl-C the others are already stopping (the trainer exits 128+signal once
      # its checkpoint is saved): another signal would cut their checkpoint short.
      (( interrupted )) && continue
      echo "[launch] process $i exited with code $code: stopping the others" >&2
      if (( ${#running[@]} )); then
        kill -s TERM "${running[@]}" 2>/dev/null || true
        ( sleep "${MMFUSION_LAUNCH_GRACE:-30}"; kill -s KILL "${running[@]}" ) &> /dev/null &
        killer=$!
      fi
    fi
  done
done
if [[ -n "$killer" ]]; then
  kill -- "-$killer" 2>/dev/null || true   # its process group: the subshell and its sleep
fi
wait 2>/dev/null || true   # the last lines through the prefix filters
exit "$status"
