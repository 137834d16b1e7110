#!/usr/bin/env bash
# Trains on every worker of a TPU slice until <workdir>/summary.json exists,
# surviving preemption: each attempt starts the trainer on all workers
# (--worker=all, JAX's multi-process runtime over the slice, a gs:// workdir),
# follows worker 0's log, and when the run ends without summary.json,
# recreates the slice if it is gone (tpu_create.sh, tpu_setup.sh) and runs
# the same command again, which resumes from the last checkpoint. See
# launch/README.md.
set -euo pipefail
SCRIPT_NAME=tpu_train.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tpu_common.sh
source "$HERE/tpu_common.sh"

ACCELERATOR_TYPE=v4-32
CONFIG=configs/imagenet_lt.py
BUCKET=""
WORKDIR=""
DISTRIBUTED=on
MAX_ATTEMPTS=10
MAX_CRASHES=2
STRAGGLER_MINUTES=10
REMOTE_DIR=lt_calib
LOG_DIR=lt_calib_logs
PYTHON=python3
ENVS=()
CREATE_ARGS=()
SETUP_ARGS=()
TRAINER_FLAGS=()

usage() {
  cat <<EOF
Usage: launch/tpu_train.sh [flags] [-- TRAINER_FLAGS...]

Runs python -m lt_calib.main on every worker of the slice and keeps
rerunning it after preemptions until gs://.../summary.json exists (at most
--max-attempts runs). TRAINER_FLAGS go to the trainer unchanged, e.g.
-- --config.model.depth=10 --config.batch_size=512.

Ctrl-C stops watching, not training: the trainer runs detached on the
workers; rerunning the same command follows it again.

Flags (default in brackets):
  --project P            Google Cloud project [gcloud's configured project]
  --zone Z               zone of the slice [$ZONE]
  --name N               queued resource and TPU node name [$NAME]
  --accelerator-type T   used when the slice must be recreated [$ACCELERATOR_TYPE]
  --runtime-version V    passed to tpu_create.sh when recreating
  --spot                 recreate as Spot capacity (tpu_create.sh --spot)
  --create-flag F        passed to tpu_create.sh, repeatable
  --setup-flag F         passed to tpu_setup.sh, repeatable (e.g. --setup-flag=--source=git)
  --config FILE[:VAR]    experiment config [$CONFIG]
  --bucket B             GCS bucket of the default workdir [lt-calib-\$USER]
  --workdir gs://...     run directory, shared by all workers and attempts
                         [gs://BUCKET/runs/CONFIG_NAME]
  --distributed MODE     the trainer's --distributed: 'on' calls
                         jax.distributed.initialize(), which finds the slice's
                         workers from the TPU VM metadata; 'auto' [$DISTRIBUTED]
  --env K=V              environment variable for the trainer, repeatable
                         (e.g. --env TFDS_DATA_DIR=gs://BUCKET/tfds)
  --max-attempts N       runs before giving up [$MAX_ATTEMPTS]
  --max-crashes N        give up after N runs that ended with an error on a
                         slice that is still up (not a preemption) [$MAX_CRASHES]
  --straggler-minutes M  after worker 0's trainer ends, stop the others after
                         M minutes [$STRAGGLER_MINUTES]
  --remote-dir D         project directory under the workers' home [$REMOTE_DIR]
  --log-dir D            log directory under the workers' home [$LOG_DIR]
  --python P             Python interpreter on the workers [$PYTHON]
  --dry-run              print the commands instead of running them; the
                         printout plays a run preempted once: attempt 1 ends
                         without summary.json, attempt 2 finds the slice
                         SUSPENDED, recreates it, sets it up and finishes
  -h, --help             this help
EOF
}

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --spot) CREATE_ARGS+=(--spot); shift ;;
    --) shift; TRAINER_FLAGS+=("$@"); break ;;
    --project | --project=*) flag_value "$@"; PROJECT=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --zone | --zone=*) flag_value "$@"; ZONE=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --name | --name=*) flag_value "$@"; NAME=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --accelerator-type | --accelerator-type=*) flag_value "$@"; ACCELERATOR_TYPE=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --runtime-version | --runtime-version=*) flag_value "$@"; CREATE_ARGS+=(--runtime-version="$FLAG_VALUE"); shift "$FLAG_SHIFT" ;;
    --create-flag | --create-flag=*) flag_value "$@"; CREATE_ARGS+=(--create-flag="$FLAG_VALUE"); shift "$FLAG_SHIFT" ;;
    --setup-flag | --setup-flag=*) flag_value "$@"; SETUP_ARGS+=("$FLAG_VALUE"); shift "$FLAG_SHIFT" ;;
    --config | --config=*) flag_value "$@"; CONFIG=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --bucket | --bucket=*) flag_value "$@"; BUCKET=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --workdir | --workdir=*) flag_value "$@"; WORKDIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --distributed | --distributed=*) flag_value "$@"; DISTRIBUTED=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --env | --env=*) flag_value "$@"; ENVS+=("$FLAG_VALUE"); shift "$FLAG_SHIFT" ;;
    --max-attempts | --max-attempts=*) flag_value "$@"; MAX_ATTEMPTS=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --max-crashes | --max-crashes=*) flag_value "$@"; MAX_CRASHES=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --straggler-minutes | --straggler-minutes=*) flag_value "$@"; STRAGGLER_MINUTES=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --remote-dir | --remote-dir=*) flag_value "$@"; REMOTE_DIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --log-dir | --log-dir=*) flag_value "$@"; LOG_DIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --python | --python=*) flag_value "$@"; PYTHON=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    *) die "unknown flag $1 (see --help; trainer flags go after --)." ;;
  esac
done
BUCKET=${BUCKET:-lt-calib-${USER:-$(id -un)}}
BUCKET=${BUCKET#gs://}  # --bucket=gs://name and --bucket=name mean the same.
BUCKET=${BUCKET%/}
config_name=$(basename "${CONFIG%%:*}" .py)
WORKDIR=${WORKDIR:-gs://$BUCKET/runs/$config_name}
WORKDIR=${WORKDIR%/}
[[ $WORKDIR == gs://?* ]] ||
  die "--workdir=$WORKDIR must be gs://...: every worker and every attempt must see it, and TPU VM disks vanish with a preempted slice."
[[ $MAX_ATTEMPTS =~ ^[1-9][0-9]*$ ]] || die "--max-attempts=$MAX_ATTEMPTS must be a positive whole number."
[[ $MAX_CRASHES =~ ^[1-9][0-9]*$ ]] || die "--max-crashes=$MAX_CRASHES must be a positive whole number."
[[ $STRAGGLER_MINUTES =~ ^[0-9]+$ ]] || die "--straggler-minutes=$STRAGGLER_MINUTES must be a whole number."
[[ $DISTRIBUTED == on || $DISTRIBUTED == auto ]] || die "--distributed=$DISTRIBUTED: allowed: on, auto."
for dir in "$REMOTE_DIR" "$LOG_DIR"; do
  [[ $dir =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] ||
    die "--remote-dir/--log-dir=$dir must be a plain path under the home directory."
done
check_streaming_data "$CONFIG" ${TRAINER_FLAGS[@]+"${TRAINER_FLAGS[@]}"}
HOSTS=$(tpu_hosts "$ACCELERATOR_TYPE") || exit 2
tpu_scope
SHARED=(--project="$PROJECT" --zone="$ZONE" --name="$NAME")
[[ -n $PROJECT ]] || SHARED=("${SHARED[@]:1}")
DRY=()
[[ $DRY_RUN == 0 ]] || DRY=(--dry-run)

# What the dry run pretends: preempted during attempt 1 (the trainer
# checkpoints on SIGTERM and exits with 143, the slice is SUSPENDED), finished
# by attempt 2.
dry_state() { if (($1 == 1)); then echo ACTIVE; else echo SUSPENDED; fi; }
dry_finished() { if (($1 >= 2)); then echo 0; else echo 1; fi; }

finished() {
  query_status "$1" gcloud storage ls "$WORKDIR/summary.json" >/dev/null 2>&1
}

# worker_cmd SUBCOMMAND [ARGS...]: the tpu_worker.sh call, as a remote command.
worker_cmd() {
  local subcommand=$1
  shift
  local command="bash ~/$REMOTE_DIR/launch/tpu_worker.sh $subcommand --log-dir ~/$LOG_DIR"
  if [[ $# -gt 0 ]]; then
    command+=" $(quote_command "$@")"
  fi
  echo "$command"
}

on_workers() {
  local worker=$1
  shift
  run gcloud compute tpus tpu-vm ssh "$NAME" "${TPU_SCOPE[@]}" --worker="$worker" --command "$(worker_cmd "$@")"
}

trainer=(--config="$CONFIG" --workdir="$WORKDIR" --distributed="$DISTRIBUTED"
  ${TRAINER_FLAGS[@]+"${TRAINER_FLAGS[@]}"})
start_flags=(--python "$PYTHON")
for env in ${ENVS[@]+"${ENVS[@]}"}; do
  start_flags+=(--env "$env")
done

note "$ACCELERATOR_TYPE slice $NAME: $HOSTS workers, one trainer process each; workdir $WORKDIR"
if finished 1; then
  note "$WORKDIR/summary.json exists: the run has finished"
  exit 0
fi
for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
  note "attempt $attempt of $MAX_ATTEMPTS"
  state=$(query "$(dry_state "$attempt")" gcloud compute tpus queued-resources describe "$NAME" \
    "${TPU_SCOPE[@]}" --format='value(state.state)' 2>/dev/null) || state=""
  state=${state:-MISSING}
  if [[ $state != ACTIVE ]]; then
    note "queued resource $NAME is $state (preempted or gone): recreating it and setting it up again"
    # A failed request (no capacity, a timed-out wait) costs one attempt.
    if ! "$HERE/tpu_create.sh" "${SHARED[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"} ${DRY[@]+"${DRY[@]}"} \
      ${DRY[@]+--dry-run-state="$state"}; then
      note "could not get the slice back"
      continue
    fi
    if ! "$HERE/tpu_setup.sh" "${SHARED[@]}" --remote-dir="$REMOTE_DIR" --python="$PYTHON" \
      ${SETUP_ARGS[@]+"${SETUP_ARGS[@]}"} ${DRY[@]+"${DRY[@]}"}; then
      note "could not set the slice up"
      continue
    fi
  fi
  note "starting the trainer on all $HOSTS workers (the same command resumes from the last checkpoint)"
  if ! on_workers all start --stamp "$(date -u +%Y%m%d-%H%M%S)" "${start_flags[@]}" -- "${trainer[@]}"; then
    note "could not start on every worker"
    continue
  fi
  note "following worker 0's log until its trainer ends"
  lines=all
  while true; do
    on_workers 0 stream --lines "$lines" || true
    # The stream also ends when ssh drops; then the trainer may still run.
    query_status 1 gcloud compute tpus tpu-vm ssh "$NAME" "${TPU_SCOPE[@]}" --worker=0 \
      --command "$(worker_cmd alive)" || break
    note "log stream lost while worker 0 still trains; following it again"
    lines=20
  done
  note "waiting for the other workers' trainers to end"
  on_workers all wait --minutes "$STRAGGLER_MINUTES" || true
  if finished "$(dry_finished "$attempt")"; then
    note "finished: $WORKDIR/summary.json"
    exit 0
  fi
  # Why worker 0's trainer ended (the exit status tpu_worker.sh recorded).
  status=$(query 143 gcloud compute tpus tpu-vm ssh "$NAME" "${TPU_SCOPE[@]}" --worker=0 \
    --command "$(worker_cmd status)" 2>/dev/null) || status=""
  status=${status##*$'\n'}
  case ${status:-unknown} in
    143) note "attempt $attempt: the trainer was stopped by SIGTERM (preemption) after a checkpoint" ;;
    unknown) note "attempt $attempt: worker 0 cannot tell how the trainer ended (slice preempted or gone?)" ;;
    running) note "attempt $attempt: worker 0's trainer still runs; following it again" ;;
    *)
      note "attempt $attempt ended with exit status $status; last lines of every worker's log:"
      on_workers all tail --lines 20 || true
      # 2 is a user error (config, flags, workdir): the same command fails again.
      [[ $status != 2 ]] || die "the trainer rejected its config or flags (exit status 2); fix them and rerun."
      crashes=$((${crashes:-0} + 1))
      ((crashes < MAX_CRASHES)) || die "$crashes runs ended with an error; see the logs above."
      ;;
  esac
done
die "no $WORKDIR/summary.json after $MAX_ATTEMPTS attempts; see the logs above and in ~/$LOG_DIR on the workers."
