#!/usr/bin/env bash
# Everything the open issues ask of a lent GPU, in their order of importance,
# each part bounded in time so that partial results always come back:
#
#   speed        what makes every later run faster, checked first: a 10-epoch
#                compiled-epoch run (static trip count) without and with CUDA
#                graphs (LT_CALIB_GPU_COMMAND_BUFFERS=1; XLA's capture log
#                kept, the losses compared), each cold then warm (persistent
#                compilation cache), then the whole 200-epoch run cold and warm
#                with the faster setting, then step throughput at batch 128
#                and 512, float32 and bfloat16
#   sharing      K = 1, 2, 4, 8 training processes on the GPU, with and
#                without NVIDIA MPS (benchmarks/shared_gpu.py)
#   fidelity     results-fidelity grids (launch/gpu_fidelity.sh): the UniMix
#                decomposition, the balanced-CIFAR-10 data effect, the rho rows
#   performance  train throughput of the step loop, the compiled epoch and
#                K = 8 seeds in one program, float32 and bfloat16
#                (benchmarks/train_throughput.py), and the wall time of the full
#                200-epoch CIFAR-10-LT run to summary.json with the fastest
#                path, float32 then bfloat16 (benchmarks/end_to_end.py)
#   resnet50     ResNet-50 train-step images/s at 224 px, float32 and bfloat16
#
#   OUT=$OUT PARTS="speed fidelity" bash launch/gpu_session.sh
#   SMOKE=1 OUT=/tmp/x bash launch/gpu_session.sh      # tiny budgets, on a CPU
#
# A device call lasts at most 600 s, so run one or two parts per call:
# PARTS selects them (default: speed fidelity sharing resnet50, in order).
# Results land in $OUT/<part>/ as JSON lines, summaries and logs. Knobs:
# SPEED_SECONDS (default 300), SHARING_SECONDS (240), SHARING_WORKERS
# (1,2,4,8), FIDELITY_SECONDS (540), PERF_SECONDS (420), RESNET_SECONDS (150),
# FIDELITY_PARTS (the fidelity script's PARTS; its other knobs, e.g.
# SEED_PASSES and WORKERS, pass through), PYTHON. The GPU host lacks
# TensorFlow and ml_collections: carry the wheel in .whl/ and the offline
# CIFAR-10 in .devdata/ (docs/results.md).
#
# A device call brings back at most 8 files, so everything is written to a
# staging folder and packed into $OUT/gpu_session.tar.gz when the script ends
# (normally or on SIGTERM/SIGINT); the tables are also printed.
set -uo pipefail
PARTS=${PARTS:-"speed fidelity sharing resnet50"}
FINAL_OUT=${OUT:-runs/gpu_session_out}
OUT=$(mktemp -d /tmp/gpu_session.XXXXXX)
mkdir -p "$FINAL_OUT"
pack() {
  tar -czf "$FINAL_OUT/gpu_session.tar.gz" -C "$OUT" . && echo "packed $FINAL_OUT/gpu_session.tar.gz"
}
trap pack EXIT
trap 'exit 143' TERM INT
# shellcheck source=gpu_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | tee "$OUT/gpu.txt"

if [ -n "${SMOKE:-}" ]; then
  # A CPU compiles and runs a whole ResNet-32 epoch in minutes: chunks of 4
  # steps of 32 keep every benchmark line within the parts' time bounds.
  BENCH_ARGS="--steps=2 --repeats=2 --warmup=1 --batch_size=32 --chunk_steps=4"
  E2E_CONFIG=configs/cifar10_lt.py:smoke
  RESNET_ARGS="--steps=1 --repeats=2 --warmup=1 --resnet_batch=8 --resnet_size=64"
  SPEED_EPOCHS="--config.num_epochs=1"; SHARING_WORKERS=${SHARING_WORKERS:-1}
else
  BENCH_ARGS="--steps=4 --repeats=3 --warmup=1"; E2E_CONFIG=configs/cifar10_lt.py
  RESNET_ARGS="--steps=5 --repeats=3 --warmup=2 --resnet_batch=128 --resnet_size=224"
  SPEED_EPOCHS="--config.num_epochs=10"; SHARING_WORKERS=${SHARING_WORKERS:-1,2,4,8}
fi

end_to_end() {  # $1 dtype, $2 deadline, $3 part: one whole run from scratch, timed.
  local left=$(( $2 - $(date +%s) )) dir=runs/gpu_e2e_$1 part=${3:-performance}
  [ "$left" -gt 30 ] || { echo "end_to_end $1: no time left"; return; }
  rm -rf "$dir"  # A whole run from scratch, never a resume.
  timeout "$left" $PYTHON benchmarks/end_to_end.py --config=$E2E_CONFIG --workdir="$dir" \
    --repeats=2 -- --config.model.dtype=$1 --config.tensorboard=False \
    2>> "$OUT/$part/end_to_end.log" | tee -a "$OUT/$part/end_to_end.jsonl"
  cp "$dir"/run0/summary.json "$OUT/$part/summary_$1.json" 2>/dev/null
  cp "$dir"/run0/metrics.jsonl "$OUT/$part/metrics_$1.jsonl" 2>/dev/null
  cp "$dir"/run0/train_metrics.jsonl "$OUT/$part/train_metrics_$1.jsonl" 2>/dev/null
}

throughput() {  # $1 part, $2 deadline, $3 benchmark args, then modes.
  # One mode per process: the benchmark compiles all its modes before timing
  # any (20-25 s each on an H100), so a time bound would cut off every figure.
  local part=$1 end=$2 args=$3 mode left
  shift 3
  for mode in "$@"; do
    left=$(( end - $(date +%s) ))
    [ "$left" -gt 20 ] || { echo "throughput $mode: no time left"; continue; }
    timeout "$left" $PYTHON benchmarks/train_throughput.py $args --modes=$mode \
      --out="$OUT/$part/throughput_$mode.jsonl" >> "$OUT/$part/throughput.txt" 2>&1
    tail -1 "$OUT/$part/throughput.txt"
  done
}

compiled_runs() {  # $1 deadline: the command-buffer check and cold/warm start-up.
  local cb dir left
  for cb in 0 1; do
    left=$(( $1 - $(date +%s) )); dir=runs/gpu_speed_cb$cb
    [ "$left" -gt 40 ] || { echo "speed cb=$cb: no time left"; return; }
    rm -rf "$dir"
    LT_CALIB_GPU_COMMAND_BUFFERS=$cb TF_CPP_MIN_LOG_LEVEL=0 \
      TF_CPP_VMODULE=command_buffer_conversion_pass=2,command_buffer_scheduling=2 \
      timeout "$left" $PYTHON benchmarks/end_to_end.py --config=$E2E_CONFIG --workdir="$dir" \
      --repeats=2 --fresh_cache -- $SPEED_EPOCHS --config.tensorboard=False \
      2> "$OUT/speed/xla_cb$cb.log" | tee -a "$OUT/speed/end_to_end.jsonl"
    grep -ci "command buffer" "$OUT/speed/xla_cb$cb.log" | sed "s/^/cb=$cb capture log lines: /"
    cp "$dir"/run1/train_metrics.jsonl "$OUT/speed/train_metrics_cb$cb.jsonl" 2>/dev/null
  done
  # The same key with and without CUDA graphs: the losses should agree.
  $PYTHON - "$OUT/speed" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = [[json.loads(l)["loss"] for l in (out / f"train_metrics_cb{c}.jsonl").read_text().splitlines()]
        for c in (0, 1) if (out / f"train_metrics_cb{c}.jsonl").exists()]
if len(runs) == 2:
  diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(*runs))
  print(f"command buffers: largest relative loss difference {diff:.3g} over {len(runs[0])} records")
PY
}

for part in $PARTS; do
  mkdir -p "$OUT/$part"
  case $part in
    speed)
      end=$(( $(date +%s) + ${SPEED_SECONDS:-300} ))
      compiled_runs $end
      end_to_end float32 $end speed  # Cold (run0) then warm (run1).
      throughput speed $end "$BENCH_ARGS" jax_epoch_f32 jax_epoch_bf16
      throughput speed $end "$BENCH_ARGS --batch_size=512 --chunk_steps=24" jax_epoch_f32
      ;;
    sharing)
      left=${SHARING_SECONDS:-240}
      timeout "$left" $PYTHON benchmarks/shared_gpu.py --workers=$SHARING_WORKERS -- \
        --modes=jax_epoch_f32 $BENCH_ARGS 2>> "$OUT/sharing/log.txt" \
        | grep '"workers"' | tee -a "$OUT/sharing/shared_gpu.jsonl"
      ;;
    fidelity)
      OUT="$OUT/fidelity" TOTAL_SECONDS=${FIDELITY_SECONDS:-540} PYTHON=$PYTHON \
        PARTS=${FIDELITY_PARTS:-"decomposition data_effect rho_rows"} \
        bash launch/gpu_fidelity.sh > "$OUT/fidelity/session.log" 2>&1
      grep -v "^|" "$OUT/fidelity/session.log" | tail -5; cat "$OUT"/fidelity/*/table.md 2>/dev/null
      ;;
    performance)
      # In order of importance: the whole float32 run (the 60 s target and its
      # figures), the throughput modes (K = 8 vs one run), then bfloat16.
      end=$(( $(date +%s) + ${PERF_SECONDS:-420} ))
      end_to_end float32 $end
      left=$(( end - $(date +%s) ))
      throughput performance $end "$BENCH_ARGS" jax_epoch_f32 jax_step_f32 jax_vmap8_f32 \
        jax_epoch_bf16 jax_vmap8_bf16
      end_to_end bfloat16 $end
      ;;
    resnet50)
      throughput resnet50 $(( $(date +%s) + ${RESNET_SECONDS:-150} )) "$RESNET_ARGS" \
        resnet50_bf16 resnet50_f32
      ;;
    *) echo "unknown part $part; allowed: speed sharing fidelity performance resnet50"; exit 2 ;;
  esac
  echo "part $part done; outputs in $OUT/$part"
done
