#!/usr/bin/env bash
# Runs the trainer on every worker of a Cloud TPU VM pod slice, with one command:
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] [--setup] [--dry-run] -- TRAINER_ARGS...
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b -- \
#     --config configs/shapes_clip.py --workdir /mnt/shared/workdirs/shapes_clip
#
# Each worker runs `cd $MMFUSION_REMOTE_DIR && $MMFUSION_REMOTE_PYTHON -m mmfusion.main
# TRAINER_ARGS` (defaults ~/mmfusion and python3). No addresses are needed: on a pod,
# mmfusion.distributed.initialize() lets JAX find the workers and the coordinator itself.
# The code must already be on every worker (e.g. `gcloud compute tpus tpu-vm scp --worker=all`
# or a `git clone` there); --setup first runs `pip install -e .` in that directory on every
# worker. --dry-run prints the gcloud command(s) instead of running them. The workdir must be
# a directory every worker sees at the same path (NFS / Filestore, or gcsfuse).
set -euo pipefail

usage() {
  echo "usage: $0 TPU_NAME ZONE [--project P] [--setup] [--dry-run] -- TRAINER_ARGS..." >&2
  exit 2
}

(( $# >= 2 )) || usage
tpu="$1"
zone="$2"
shift 2
project=''
setup=0
dry_run=0
while (( $# )); do
  case "$1" in
    --project) (( $# >= 2 )) || usage; project="$2"; shift 2 ;;
    --project=*) project="${1#--project=}"; shift ;;
    --setup) setup=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option '$1' (trainer arguments go after --)" >&2; usage ;;
  esac
done

# Quotes one word for a POSIX shell, only where it needs it: 'it'\''s' style.
quote() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local word sep=''
  for word in "$@"; do
    printf '%s%s' "$sep" "$(quote "$word")"
    sep=' '
  done
}

remote_dir="${MMFUSION_REMOTE_DIR:-~/mmfusion}"
remote_python="${MMFUSION_REMOTE_PYTHON:-python3}"

# The directory as the remote shell should see it: a leading ~ stays unquoted so that it
# expands there, to the remote home; everything else is quoted.
if [[ "$remote_dir" == '~' || "$remote_dir" == '~/'* ]]; then
  rest="${remote_dir#\~}"
  rest="${rest#/}"
  cd_dir="~/${rest:+$(quote "$rest")}"
else
  cd_dir="$(quote "$remote_dir")"
fi

# One string for the remote shell: every trainer argument quoted on its own.
quoted_args="${*:+ $(quote_all "$@")}"

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone")
[[ -n "$project" ]] && gcloud_ssh+=(--project "$project")
gcloud_ssh+=(--worker=all)

run() {
  if (( dry_run )); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

if (( setup )); then
  run "${gcloud_ssh[@]}" --command "cd $cd_dir && $remote_python -m pip install -e ."
fi
run "${gcloud_ssh[@]}" --command "cd $cd_dir && $remote_python -m mmfusion.main$quoted_args"
