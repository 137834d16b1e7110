#!/usr/bin/env bash
# Runs ON each TPU VM worker, called by launch/tpu_train.sh through
# `gcloud compute tpus tpu-vm ssh --command`: starts the trainer detached
# (so it survives the ssh session and the workstation), follows its log, and
# stops it by its recorded process id. Not meant for the workstation.
set -euo pipefail
SCRIPT_NAME=tpu_worker.sh

usage() {
  cat <<'EOF'
Usage: launch/tpu_worker.sh COMMAND [flags] [-- TRAINER_FLAGS...]

Commands:
  start -- FLAGS   start `python -m lt_calib.main FLAGS` in the background; a
                   run of this worker that is still going is kept when its
                   flags are the same, and stopped (SIGTERM: it checkpoints)
                   when they differ
  stream           print the current log, following it until the trainer ends
  alive            exit status 0 while the trainer runs, 1 once it has ended
  status           print the trainer's exit status (143: stopped by SIGTERM
                   after a checkpoint; 2: a user error), 'running' or 'unknown'
  wait             wait until the trainer ends; stop it after --minutes
  stop             stop the trainer (SIGTERM, then SIGKILL after --minutes)
  tail             print the last --lines lines of the current log

Flags (default in brackets):
  --log-dir D      logs, pid and flags of the run [~/lt_calib_logs]
  --python P       Python interpreter [python3]
  --env K=V        environment variable for the trainer, repeatable
  --stamp S        suffix of the new log file [UTC date-time]
  --lines N        lines for tail, or for stream ('all' = whole log) [all]
  --minutes M      wait/stop grace period [10]
EOF
}

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
COMMAND=$1
shift
LOG_DIR=$HOME/lt_calib_logs
PYTHON=python3
ENVS=()
STAMP=$(date -u +%Y%m%d-%H%M%S)
LINES=all
MINUTES=10
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --log-dir) LOG_DIR=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --stamp) STAMP=$2; shift 2 ;;
    --lines) LINES=$2; shift 2 ;;
    --minutes) MINUTES=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "$SCRIPT_NAME: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PID_FILE=$LOG_DIR/train.pid
FLAGS_FILE=$LOG_DIR/train.flags
STATUS_FILE=$LOG_DIR/train.status
CURRENT=$LOG_DIR/current.log
WHO=$(hostname)

# Pid of this worker's trainer if it still runs. The command line is checked
# too: after a reboot the recorded pid may belong to another process.
running_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid=$(cat "$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  grep -qa "lt_calib.main" "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

# Waits up to $1 seconds for the trainer to end; status 1 if it still runs.
wait_seconds() {
  local deadline=$((SECONDS + $1))
  while running_pid >/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 2
  done
}

stop() {
  local pid
  pid=$(running_pid) || return 0
  # SIGTERM is the trainer's preemption signal: it checkpoints, then exits.
  echo "$WHO: stopping trainer pid $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_seconds $((MINUTES * 60)); then
    echo "$WHO: trainer pid $pid ignored SIGTERM for $MINUTES min; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

case $COMMAND in
  start)
    mkdir -p "$LOG_DIR"
    flags=$(printf '%q ' "$PYTHON" "$@" ${ENVS[@]+"${ENVS[@]}"})
    if pid=$(running_pid); then
      if [[ -f $FLAGS_FILE && $(cat "$FLAGS_FILE") == "$flags" ]]; then
        echo "$WHO: the same run is still going (pid $pid); following it"
        exit 0
      fi
      stop
    fi
    log=$LOG_DIR/train-$STAMP.log
    rm -f "$STATUS_FILE" "$PID_FILE"
    printf '%s\n' "$flags" >"$FLAGS_FILE"
    ln -sfn "$log" "$CURRENT"
    cd "$REPO"
    # nohup and no terminal: the trainer outlives the ssh session that started
    # it. A small shell waits for it to record its exit status; signals go to
    # the trainer's own pid (in the pid file), never through that shell.
    # shellcheck disable=SC2016  # Expanded by that small shell.
    nohup bash -c '"$@" & echo $! >"$0.pid"; wait $!; echo $? >"$0.status"' \
      "$LOG_DIR/train" env PYTHONUNBUFFERED=1 ${ENVS[@]+"${ENVS[@]}"} \
      "$PYTHON" -m lt_calib.main "$@" >"$log" 2>&1 </dev/null &
    for _ in $(seq 50); do [[ -s $PID_FILE ]] && break; sleep 0.1; done
    echo "$WHO: started trainer pid $(cat "$PID_FILE") (log $log)"
    ;;
  stream)
    [[ -e $CURRENT ]] || { echo "$WHO: no log in $LOG_DIR yet"; exit 1; }
    from=+1
    [[ $LINES == all ]] || from=$LINES
    if pid=$(running_pid); then
      # --pid: tail ends when the trainer does.
      tail -n "$from" -F --pid="$pid" "$CURRENT"
    else
      tail -n "$from" "$CURRENT"
    fi
    ;;
  alive) running_pid >/dev/null ;;
  status)
    if running_pid >/dev/null; then
      echo running
    elif [[ -s $STATUS_FILE ]]; then
      cat "$STATUS_FILE"
    else
      echo unknown
    fi
    ;;
  wait)
    if ! wait_seconds $((MINUTES * 60)); then
      echo "$WHO: trainer still running $MINUTES min after worker 0's ended"
      stop
    fi
    ;;
  stop) stop ;;
  tail)
    [[ -e $CURRENT ]] || { echo "$WHO: no log in $LOG_DIR"; exit 0; }
    n=$LINES
    [[ $n != all ]] || n=20
    tail -n "$n" "$CURRENT" | sed "s/^/[$WHO] /"
    ;;
  *) echo "$SCRIPT_NAME: unknown command $COMMAND (see --help)" >&2; exit 2 ;;
esac
