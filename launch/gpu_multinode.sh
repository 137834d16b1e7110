#!/usr/bin/env bash
# Multi-node GPU training: one trainer process per node, all GPUs of a node
# in that process, joined by JAX's distributed runtime:
#   python -m lt_calib.main ... --coordinator_address=HEAD:PORT \
#     --num_processes=NNODES --process_id=RANK
# Under Slurm (inside sbatch/salloc) one `srun` starts a task per node and
# each task takes its rank from $SLURM_PROCID; elsewhere the script starts
# rank r on the r-th of --hosts over ssh. See launch/README.md.
set -euo pipefail
SCRIPT_NAME=gpu_multinode.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# sbatch runs a copy of this script from its spool directory: then the
# checkout is the directory sbatch was called from.
if [[ ! -f $HERE/tpu_common.sh && -f ${SLURM_SUBMIT_DIR:-}/launch/tpu_common.sh ]]; then
  HERE=$SLURM_SUBMIT_DIR/launch
fi
# shellcheck source=tpu_common.sh
source "$HERE/tpu_common.sh"

LAUNCHER=auto
HOSTS=""
NNODES=""
COORDINATOR=""
PORT=12355
CONFIG=configs/imagenet_lt.py
WORKDIR=""
REPO_DIR=$(cd "$HERE/.." && pwd)
PYTHON=python3
ENVS=()
SSH_FLAGS=()
SRUN_FLAGS=()
LOG_DIR=""
MAX_ATTEMPTS=1
TRAINER_FLAGS=()

usage() {
  cat <<EOF
Usage: launch/gpu_multinode.sh [flags] [-- TRAINER_FLAGS...]

Starts python -m lt_calib.main once per node with the same
--coordinator_address (rank 0's node) and --num_processes, and ranks
--process_id=0..N-1. TRAINER_FLAGS go to every process unchanged, e.g.
-- --config.model.depth=50.

  Slurm:  sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \\
            launch/gpu_multinode.sh --workdir=/shared/runs/r50   (from the checkout)
  ssh:    launch/gpu_multinode.sh --hosts=gpu0,gpu1,gpu2,gpu3 --workdir=/shared/runs/r50

The repository and Python environment must be at the same path on every
node, and the workdir on storage every node sees (NFS, Lustre, gs://).

Flags (default in brackets):
  --launcher L        slurm, ssh or auto (slurm inside a Slurm job) [$LAUNCHER]
  --hosts H1,H2,...   ssh: the nodes, rank 0 first; Slurm: node names for a
                      --dry-run outside an allocation
  --nnodes N          nodes [Slurm: \$SLURM_JOB_NUM_NODES; ssh: number of --hosts]
  --coordinator HOST  address of rank 0's node as the others reach it [first node]
  --port P            coordinator port on rank 0's node [$PORT]
  --config FILE[:VAR] experiment config [$CONFIG]
  --workdir DIR       shared run directory [REPO_DIR/runs/CONFIG_NAME]
  --repo-dir DIR      the checkout on every node [$REPO_DIR]
  --python P          Python interpreter on every node [$PYTHON]
  --env K=V           environment variable for the trainer, repeatable
                      (e.g. --env NCCL_SOCKET_IFNAME=eth0)
  --ssh-flag F        extra ssh option, repeatable (e.g. --ssh-flag=-p2222)
  --srun-flag F       extra srun option, repeatable (e.g. --srun-flag=--gpus-per-node=8
                      where job steps do not inherit the job's GPUs)
  --log-dir DIR       ssh: where rank r's output goes, as rank<r>.log [WORKDIR_NAME logs under ./runs]
  --max-attempts N    rerun (resuming) until WORKDIR/summary.json exists, at
                      most N runs [$MAX_ATTEMPTS]
  --dry-run           print the commands instead of running them
  -h, --help          this help
EOF
}

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAINER_FLAGS+=("$@"); break ;;
    --launcher | --launcher=*) flag_value "$@"; LAUNCHER=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --hosts | --hosts=*) flag_value "$@"; HOSTS=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --nnodes | --nnodes=*) flag_value "$@"; NNODES=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --coordinator | --coordinator=*) flag_value "$@"; COORDINATOR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --port | --port=*) flag_value "$@"; PORT=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --config | --config=*) flag_value "$@"; CONFIG=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --workdir | --workdir=*) flag_value "$@"; WORKDIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --repo-dir | --repo-dir=*) flag_value "$@"; REPO_DIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --python | --python=*) flag_value "$@"; PYTHON=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --env | --env=*) flag_value "$@"; ENVS+=("$FLAG_VALUE"); shift "$FLAG_SHIFT" ;;
    --ssh-flag | --ssh-flag=*) flag_value "$@"; SSH_FLAGS+=("$FLAG_VALUE"); shift "$FLAG_SHIFT" ;;
    --srun-flag | --srun-flag=*) flag_value "$@"; SRUN_FLAGS+=("$FLAG_VALUE"); shift "$FLAG_SHIFT" ;;
    --log-dir | --log-dir=*) flag_value "$@"; LOG_DIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --max-attempts | --max-attempts=*) flag_value "$@"; MAX_ATTEMPTS=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    *) die "unknown flag $1 (see --help; trainer flags go after --)." ;;
  esac
done

if [[ $LAUNCHER == auto ]]; then
  if [[ -n ${SLURM_JOB_ID:-} ]]; then LAUNCHER=slurm; else LAUNCHER=ssh; fi
fi
[[ $PORT =~ ^[0-9]+$ ]] || die "--port=$PORT must be a number."
[[ $MAX_ATTEMPTS =~ ^[1-9][0-9]*$ ]] || die "--max-attempts=$MAX_ATTEMPTS must be a positive whole number."
IFS=, read -r -a NODES <<<"$HOSTS"
case $LAUNCHER in
  slurm)
    if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
      mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
      NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${#NODES[@]}}}
    elif [[ $DRY_RUN == 1 ]]; then
      # Outside an allocation, a dry run shows the plan for made-up nodes.
      NNODES=${NNODES:-${#NODES[@]}}
      ((NNODES > 0)) || NNODES=2
      if ((${#NODES[@]} == 0)); then
        for ((r = 0; r < NNODES; r++)); do NODES+=("node$r"); done
      fi
    else
      die "--launcher=slurm outside a Slurm job: run it under sbatch/salloc, or give --hosts for ssh."
    fi
    ;;
  ssh)
    ((${#NODES[@]} > 0)) || die "--launcher=ssh needs --hosts=H1,H2,... (rank 0 first)."
    NNODES=${NNODES:-${#NODES[@]}}
    ;;
  *) die "--launcher=$LAUNCHER is unknown; allowed: slurm, ssh, auto." ;;
esac
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "--nnodes=$NNODES must be a positive whole number."
((NNODES <= ${#NODES[@]})) || die "--nnodes=$NNODES but only ${#NODES[@]} nodes are known (--hosts)."
COORDINATOR=${COORDINATOR:-${NODES[0]}}
config_name=$(basename "${CONFIG%%:*}" .py)
WORKDIR=${WORKDIR:-$REPO_DIR/runs/$config_name}
LOG_DIR=${LOG_DIR:-runs/gpu_multinode_logs/$(basename "$WORKDIR")}

# The trainer's command for rank $1 (a shell word: $SLURM_PROCID stays literal).
trainer_command() {
  local rank=$1 flags=(--config="$CONFIG" --workdir="$WORKDIR"
    --coordinator_address="$COORDINATOR:$PORT" --num_processes="$NNODES")
  local command
  command="cd $(quote_word "$REPO_DIR") && exec env PYTHONUNBUFFERED=1"
  if ((${#ENVS[@]} > 0)); then
    command+=" $(quote_command "${ENVS[@]}")"
  fi
  command+=" $(quote_command "$PYTHON" -m lt_calib.main "${flags[@]}")"
  command+=" --process_id=$rank"
  if ((${#TRAINER_FLAGS[@]} > 0)); then
    command+=" $(quote_command "${TRAINER_FLAGS[@]}")"
  fi
  echo "$command"
}

finished() {
  local summary=$WORKDIR/summary.json
  if [[ $WORKDIR == gs://* ]]; then
    query_status "$1" gcloud storage ls "$summary" >/dev/null 2>&1
  elif [[ $LAUNCHER == ssh ]]; then
    query_status "$1" ssh ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} "${NODES[0]}" test -f "$summary"
  else
    query_status "$1" test -f "$summary"
  fi
}

run_slurm() {
  local r
  for ((r = 0; r < NNODES; r++)); do
    note "rank $r on ${NODES[r]}: $(trainer_command "$r")"
  done
  # One task per node; --kill-on-bad-exit ends the others if a rank dies.
  # On preemption or the time limit Slurm sends SIGTERM: every rank checkpoints.
  run srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    ${SRUN_FLAGS[@]+"${SRUN_FLAGS[@]}"} bash -c "$(trainer_command '$SLURM_PROCID')"
}

PIDS=()
# Ctrl-C or SIGTERM: ask every rank's trainer to checkpoint and stop.
stop_ranks() {
  local r pid
  trap - INT TERM
  note "stopping every rank (SIGTERM: they checkpoint first)"
  for ((r = 0; r < NNODES; r++)); do
    pid=$(sed -n 's/^remote pid \([0-9]*\)$/\1/p;q' "$LOG_DIR/rank$r.log" 2>/dev/null || true)
    if [[ -n $pid ]]; then
      ssh ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} "${NODES[r]}" kill -TERM "$pid" || true
    fi
  done
  wait "${PIDS[@]}" 2>/dev/null || true
  exit 143
}

run_ssh() {
  local r status=0 command
  run mkdir -p "$LOG_DIR"
  PIDS=()
  for ((r = 0; r < NNODES; r++)); do
    # The remote shell prints its pid, then becomes the trainer (exec).
    command="echo remote pid \$\$ && $(trainer_command "$r")"
    if [[ $DRY_RUN == 1 ]]; then
      note "rank $r on ${NODES[r]}, output in $LOG_DIR/rank$r.log"
      run ssh ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} "${NODES[r]}" "$command"
      continue
    fi
    ssh ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} "${NODES[r]}" "$command" </dev/null >"$LOG_DIR/rank$r.log" 2>&1 &
    PIDS+=($!)
  done
  [[ $DRY_RUN == 0 ]] || return 0
  trap stop_ranks INT TERM
  note "following rank 0 (all ranks: $LOG_DIR/rank*.log)"
  tail -n +1 -F --pid="${PIDS[0]}" "$LOG_DIR/rank0.log" &
  local tail_pid=$!
  for r in "${!PIDS[@]}"; do
    wait "${PIDS[r]}" || { status=$?; note "rank $r exited with status $status"; }
  done
  wait "$tail_pid" 2>/dev/null || true
  trap - INT TERM
  return "$status"
}

note "$NNODES nodes (${NODES[*]:0:NNODES}), coordinator $COORDINATOR:$PORT, workdir $WORKDIR"
for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
  ((MAX_ATTEMPTS == 1)) || note "attempt $attempt of $MAX_ATTEMPTS"
  status=0
  if [[ $LAUNCHER == slurm ]]; then run_slurm || status=$?; else run_ssh || status=$?; fi
  if finished 0; then
    note "finished: $WORKDIR/summary.json"
    exit 0
  fi
  note "attempt $attempt ended (status $status) without $WORKDIR/summary.json"
  [[ $status != 2 ]] || die "the trainer rejected its config or flags (exit status 2); fix them and rerun."
done
exit 1
