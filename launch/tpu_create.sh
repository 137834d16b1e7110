#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice through a queued resource and waits
# until it is ACTIVE. Safe to rerun: an ACTIVE slice is left alone, a queued
# or provisioning one is waited for, a SUSPENDED or FAILED one (a preempted
# Spot slice) is deleted and requested again. See launch/README.md.
set -euo pipefail
SCRIPT_NAME=tpu_create.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tpu_common.sh
source "$HERE/tpu_common.sh"

ACCELERATOR_TYPE=v4-32
RUNTIME_VERSION=tpu-ubuntu2204-base
SPOT=0
WAIT_MINUTES=720
POLL_SECONDS=30
DRY_RUN_STATE=MISSING
CREATE_FLAGS=()

usage() {
  cat <<EOF
Usage: launch/tpu_create.sh [flags]

Requests a TPU slice as a queued resource (gcloud compute tpus
queued-resources create) whose node has the same name, and waits until the
request is ACTIVE. Rerunning it is safe (see the header of the script).

Flags (default in brackets):
  --project P            Google Cloud project [gcloud's configured project]
  --zone Z               zone with the accelerator type [$ZONE]
  --name N               queued resource and TPU node name [$NAME]
  --accelerator-type T   e.g. v4-8, v4-32 (16 chips, 4 hosts), v5p-32, v6e-16 [$ACCELERATOR_TYPE]
  --runtime-version V    TPU VM image: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5
                         (v5p), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e) [$RUNTIME_VERSION]
  --spot                 request Spot capacity (cheaper, preemptible) [off]
  --create-flag F        extra flag for 'queued-resources create', repeatable
                         (e.g. --create-flag=--reserved, --create-flag=--network=NET)
  --wait-minutes M       give up waiting for ACTIVE after M minutes [$WAIT_MINUTES]
  --poll-seconds S       seconds between state checks [$POLL_SECONDS]
  --dry-run              print the gcloud commands instead of running them
  --dry-run-state S      state the dry run pretends the queued resource is in:
                         MISSING, ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED [$DRY_RUN_STATE]
  -h, --help             this help
EOF
}

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --spot) SPOT=1; shift ;;
    --project | --project=*) flag_value "$@"; PROJECT=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --zone | --zone=*) flag_value "$@"; ZONE=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --name | --name=*) flag_value "$@"; NAME=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --accelerator-type | --accelerator-type=*) flag_value "$@"; ACCELERATOR_TYPE=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --runtime-version | --runtime-version=*) flag_value "$@"; RUNTIME_VERSION=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --create-flag | --create-flag=*) flag_value "$@"; CREATE_FLAGS+=("$FLAG_VALUE"); shift "$FLAG_SHIFT" ;;
    --wait-minutes | --wait-minutes=*) flag_value "$@"; WAIT_MINUTES=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --poll-seconds | --poll-seconds=*) flag_value "$@"; POLL_SECONDS=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --dry-run-state | --dry-run-state=*) flag_value "$@"; DRY_RUN_STATE=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    *) die "unknown flag $1 (see --help)." ;;
  esac
done
[[ $WAIT_MINUTES =~ ^[0-9]+$ ]] || die "--wait-minutes=$WAIT_MINUTES must be a whole number."
[[ $POLL_SECONDS =~ ^[1-9][0-9]*$ ]] || die "--poll-seconds=$POLL_SECONDS must be a positive whole number."
HOSTS=$(tpu_hosts "$ACCELERATOR_TYPE") || exit 2
tpu_scope

# The queued resource's state, or MISSING when there is none of that name.
qr_state() {
  local state
  state=$(query "$1" gcloud compute tpus queued-resources describe "$NAME" "${TPU_SCOPE[@]}" \
    --format='value(state.state)' 2>/dev/null) || state=""
  echo "${state:-MISSING}"
}

create() {
  local cmd=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME"
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${TPU_SCOPE[@]}")
  if [[ $SPOT == 1 ]]; then
    cmd+=(--spot)
  fi
  note "requesting $ACCELERATOR_TYPE ($HOSTS host(s)) as queued resource $NAME in $ZONE"
  run "${cmd[@]}" ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
}

delete() {
  # --force deletes the node(s) first; the queued resource goes with them.
  note "deleting queued resource $NAME ($1) so that it can be requested again"
  run gcloud compute tpus queued-resources delete "$NAME" "${TPU_SCOPE[@]}" --force --quiet
}

# Polls until ACTIVE (or fails when the request fails or the wait runs out).
wait_active() {
  local deadline=$((SECONDS + WAIT_MINUTES * 60)) state
  while true; do
    state=$(qr_state ACTIVE)
    case $state in
      ACTIVE) note "$NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | MISSING)
        die "queued resource $NAME ended up $state while waiting; rerun this script to request it again." ;;
    esac
    ((SECONDS < deadline)) || die "$NAME still $state after $WAIT_MINUTES minutes; rerun to keep waiting."
    note "$NAME is $state; next check in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
  done
}

state=$(qr_state "$DRY_RUN_STATE")
case $state in
  ACTIVE) note "$NAME is already ACTIVE; nothing to create" ;;
  CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING)
    note "$NAME is already requested ($state)"
    wait_active ;;
  SUSPENDING | SUSPENDED | FAILED)
    delete "$state"
    create
    wait_active ;;
  DELETING)
    note "$NAME is being deleted; waiting before requesting it again"
    while [[ $(qr_state MISSING) != MISSING ]]; do sleep "$POLL_SECONDS"; done
    create
    wait_active ;;
  MISSING)
    create
    wait_active ;;
  *) die "queued resource $NAME is in state '$state', which this script does not handle." ;;
esac
