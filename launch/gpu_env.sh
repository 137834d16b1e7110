# Sourced by launch/gpu_session.sh and launch/gpu_fidelity.sh (not run by
# itself): the environment both need, on a lent GPU host or, for a test, on a
# CPU. Sets LT_CALIB_DATA_DIR (.devdata/ or ../shared/data/, whichever holds
# the offline CIFAR-10), the decoded-image cache, PYTHON (the checkout's
# virtual environment where there is one, else the host's python3, which has
# JAX but lacks ml_collections: then its wheel is installed from .whl/) and
# PYTHONPATH.
if [ -z "${LT_CALIB_DATA_DIR:-}" ]; then
  for dir in "$PWD/.devdata" "$PWD/../shared/data"; do
    if [ -f "$dir/cifar10_jpeg.npz" ]; then export LT_CALIB_DATA_DIR=$dir; break; fi
  done
fi
export LT_CALIB_CACHE_DIR=${LT_CALIB_CACHE_DIR:-/tmp/lt_calib_cache}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! $PYTHON -c "import ml_collections, tqdm" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "$PYTHON lacks ml_collections or tqdm and .whl/ holds no wheel to install; see docs/results.md"
    exit 1
  fi
  $PYTHON -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
case ":${PYTHONPATH:-}:" in
  *":$PWD:"*) ;;
  *) export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} ;;
esac
