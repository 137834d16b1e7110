#!/usr/bin/env bash
# Paper protocol (ResNet-32, 200 epochs, batch 128) on one GPU for the four
# Table 4 cells {none, unimix} x {ce, bayias} on offline CIFAR-10-LT rho=100,
# run concurrently (a ResNet-32 at batch 128 leaves most of a GPU idle), plus
# the train-step benchmark first. Results: $OUT/bench.json, $OUT/results.tgz.
#
# MIXES / LOSSES pick a subset of the cells, EXTRA_FLAGS adds config overrides.
# Expects: offline data in $LT_CALIB_DATA_DIR (default .devdata), and where
# ml_collections is missing, its wheel in .whl/ (see docs/results.md).
set -uo pipefail
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"
export LT_CALIB_DATA_DIR=${LT_CALIB_DATA_DIR:-$PWD/.devdata}
export LT_CALIB_CACHE_DIR=${LT_CALIB_CACHE_DIR:-/tmp/lt_calib_cache}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if ! python3 -c "import ml_collections" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# Benchmark alone on the GPU, before the runs share it (SKIP_BENCH=1 skips).
if [ -z "${SKIP_BENCH:-}" ]; then
  python3 benchmarks/train_step.py --steps=300 | tee "$OUT/bench.json"
  python3 benchmarks/train_step.py --steps=300 --mix=none --loss=ce | tee -a "$OUT/bench.json"
fi
RUNS=${RUNS:-runs/protocol}; mkdir -p "$RUNS"
for mix in ${MIXES:-none unimix}; do
  for loss in ${LOSSES:-ce bayias}; do
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout ${RUN_SECONDS:-480} python3 -m lt_calib.main \
      --config=configs/cifar10_lt.py --workdir="$RUNS/${mix}_${loss}" \
      --config.mix.name=$mix --config.loss.name=$loss --config.log_every_steps=970 \
      ${EXTRA_FLAGS:-} > "$RUNS/${mix}_${loss}.log" 2>&1 &
  done
done
wait
for d in "$RUNS"/*/; do n=$(basename "$d"); cp "$d/summary.json" "$RUNS/${n}_summary.json" 2>/dev/null; done
tar czf "$OUT/results.tgz" -C "$RUNS" --exclude=checkpoints .
grep -h "eval epoch 200\|Error" "$RUNS"/*.log
