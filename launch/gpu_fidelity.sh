#!/usr/bin/env bash
# Results-fidelity grids (configs/grids/fidelity.py) on one lent GPU machine,
# in the results issue's order: the data effect (balanced CIFAR-10, then the
# second-generation control), the decomposition, then the rho rows, each
# bounded by a time budget so that partial results always come back. Several
# grid processes share each workdir (a ResNet-32 at batch 128 leaves most of
# a GPU idle); each cell is trained by the process that locks it first.
#
#   OUT=$OUT bash launch/gpu_fidelity.sh              # paper protocol, GPU
#   SMOKE=1 OUT=/tmp/x bash launch/gpu_fidelity.sh    # tiny, on a CPU
#
# Resumable: workdirs live under $RUNS (ignored by git, so kept on a warm
# machine between calls); run the same command again to go on from there.
# After each part, every table.md / table.csv / grid.json and each cell's
# summary.json and metrics.jsonl are copied to $OUT/<part>/, with the logs.
#
# Knobs (environment):
#   TOTAL_SECONDS   whole script, copying included (default 540: one 600 s call)
#   GRACE_SECONDS   from SIGTERM to KILL of a run that has not stopped (default 60)
#   DECOMP_SECONDS, DATA_SECONDS, GEN2_SECONDS, RHO_SECONDS
#                   most seconds each part may take (default: what is left)
#   PARTS           default "data_effect second_generation decomposition rho_rows"
#   RHOS            rho_rows values, default "10 50 100 200"
#   RECIPE          rho_rows' UniMix recipe (a decomposition row), default official
#   SEED_PASSES     seed counts run in turn, default "1 3": every row gets seed 0
#                   before any row gets seeds 1 and 2
#   WORKERS         grid processes per part (default 4; 2 with SMOKE=1)
#   BUDGET          '' (paper protocol, 200 epochs) or cpu; SMOKE=1 sets smoke
#   RUNS            workdirs root (default runs/fidelity[_<budget>])
#   PYTHON          default .venv/bin/python if present, else python3
# Expects offline CIFAR-10 in $LT_CALIB_DATA_DIR (default: .devdata/ or
# ../shared/data/, whichever holds cifar10_jpeg.npz) and, where ml_collections is
# missing (the GPU host), its wheel in .whl/ (see docs/results.md).
set -uo pipefail
START=$(date +%s)
TOTAL_SECONDS=${TOTAL_SECONDS:-540}
DEADLINE=$((START + TOTAL_SECONDS))
RESERVE_SECONDS=${RESERVE_SECONDS:-30}   # Kept back for report passes and copies.
# A run stops at its next step boundary after SIGTERM (with a checkpoint);
# one that has not stopped this many seconds later is killed.
GRACE_SECONDS=${GRACE_SECONDS:-60}
if [ -n "${SMOKE:-}" ]; then
  BUDGET=smoke; WORKERS=${WORKERS:-2}; SEED_PASSES=${SEED_PASSES:-1}
else
  BUDGET=${BUDGET:-}; WORKERS=${WORKERS:-4}; SEED_PASSES=${SEED_PASSES:-"1 3"}
fi
PARTS=${PARTS:-"data_effect second_generation decomposition rho_rows"}
RHOS=${RHOS:-"10 50 100 200"}
RECIPE=${RECIPE:-official}
RUNS=${RUNS:-runs/fidelity${BUDGET:+_$BUDGET}}
OUT=${OUT:-runs/fidelity_out}
mkdir -p "$OUT" "$RUNS"

# shellcheck source=gpu_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
# One compilation cache for every process: seeds and workers reuse programs.
# ($RUNS made absolute: it may be given either way.)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(cd "$RUNS" && pwd)/compilation_cache}
# Each process may take its share of GPU memory (XLA preallocates 75 % otherwise).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(
  awk -v n="$WORKERS" 'BEGIN { printf "%.2f", 0.9 / n }')}

{
  echo "start: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null)"
  echo "budget='$BUDGET' parts='$PARTS' rhos='$RHOS' recipe=$RECIPE seed_passes='$SEED_PASSES'"
  echo "workers=$WORKERS total_seconds=$TOTAL_SECONDS mem_fraction=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi: $($PYTHON -c 'import jax; print(jax.devices())' 2>&1 | tail -1)"
} | tee "$OUT/run_info.txt"

# Workers run under `timeout`, each in its own process group: stop them (and
# so their runs, which checkpoint on SIGTERM) if this script is stopped.
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
trap 'exit 143' TERM INT

seconds_left() {  # Seconds to the script's deadline, less the reserve.
  echo $((DEADLINE - RESERVE_SECONDS - $(date +%s)))
}

grid_arg() {  # $1 = part[,options]: the fidelity config arg with the budget.
  echo "$1${BUDGET:+,$BUDGET}"
}

start_workers() {  # $1 seconds, $2 workdir, $3 config arg, $4 processes.
  mkdir -p "$2/logs"
  local k
  for k in $(seq 1 "$4"); do
    # SIGTERM makes a run checkpoint and the grid write its tables.
    timeout --kill-after="$GRACE_SECONDS" "$1" $PYTHON -m lt_calib.grid \
      --config="configs/grids/fidelity.py:$3" --workdir="$2" \
      >> "$2/logs/worker$k.log" 2>&1 &
    sleep 2  # Staggered, so the first cells' compilations do not all coincide.
  done
}

report_and_copy() {  # $1 workdir, $2 config arg (with seeds=), $3 name under $OUT.
  mkdir -p "$1/logs"
  timeout 120 $PYTHON -m lt_calib.grid --config="configs/grids/fidelity.py:$2,report" \
    --workdir="$1" >> "$1/logs/report.log" 2>&1 \
    || echo "report pass of $1 failed; see $1/logs/report.log"
  local dest="$OUT/$3" cell
  mkdir -p "$dest/logs"
  cp "$1"/table.md "$1"/table.csv "$1"/grid.json "$dest/" 2>/dev/null
  cp "$1"/logs/*.log "$dest/logs/" 2>/dev/null
  for cell in "$1"/*__*/; do
    [ -d "$cell" ] || continue
    mkdir -p "$dest/$(basename "$cell")"
    cp "$cell"summary.json "$cell"metrics.jsonl "$dest/$(basename "$cell")/" 2>/dev/null
  done
  echo "== $3 ($(( $(date +%s) - START )) s since start)"
  cat "$dest/table.md" 2>/dev/null || echo "(no table yet)"
}

run_part() {  # $1 part, $2 seconds cap; one workdir per grid of the part.
  local part=$1 cap=$2 seeds dir args=() names=() dirs=() i n
  case $part in
    rho_rows)
      for rho in $RHOS; do
        args+=("rho_rows,rho=$rho,recipe=$RECIPE"); names+=("rho_rows_rho$rho")
      done ;;
    *) args+=("$part"); names+=("$part") ;;
  esac
  for i in "${!args[@]}"; do dirs+=("$RUNS/${names[$i]}"); done
  # Workers per grid: the part's share of WORKERS, at least one each.
  n=$(( WORKERS / ${#args[@]} )); [ "$n" -ge 1 ] || n=1
  local part_deadline=$(( $(date +%s) + cap ))
  for seeds in $SEED_PASSES; do
    local left=$(( part_deadline - $(date +%s) )) total
    total=$(seconds_left); [ "$total" -lt "$left" ] && left=$total
    left=$(( left - GRACE_SECONDS ))
    if [ "$left" -lt 20 ]; then echo "$part: no time left for seeds=$seeds"; break; fi
    echo "$part: seeds=$seeds, $left s, $n process(es) per grid"
    for i in "${!args[@]}"; do
      start_workers "$left" "${dirs[$i]}" "$(grid_arg "${args[$i]},seeds=$seeds")" "$n"
    done
    wait
  done
  # The report counts every seed of the largest pass that is finished.
  for i in "${!args[@]}"; do
    report_and_copy "${dirs[$i]}" "$(grid_arg "${args[$i]},seeds=${SEED_PASSES##* }")" \
      "${names[$i]}"
  done
}

for part in $PARTS; do
  case $part in
    decomposition) cap=${DECOMP_SECONDS:-$TOTAL_SECONDS} ;;
    data_effect) cap=${DATA_SECONDS:-$TOTAL_SECONDS} ;;
    second_generation)
      cap=${GEN2_SECONDS:-$TOTAL_SECONDS}
      # The degraded copy is made where it is used (132 MB: too large to carry).
      [ -f data/cifar10_jpeg_gen2.npz ] || $PYTHON -m lt_calib.data.degrade \
        --src="$LT_CALIB_DATA_DIR/cifar10_jpeg.npz" --out=data/cifar10_jpeg_gen2.npz \
        --reference_pool="" > "$OUT/degrade.log" 2>&1 ;;
    rho_rows) cap=${RHO_SECONDS:-$TOTAL_SECONDS} ;;
    *) echo "unknown part $part; allowed: data_effect second_generation decomposition rho_rows"
       exit 2 ;;
  esac
  run_part "$part" "$cap"
done
echo "end: $(date -u +%FT%TZ), $(( $(date +%s) - START )) s" | tee -a "$OUT/run_info.txt"
