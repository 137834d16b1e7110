#!/usr/bin/env bash
# Puts the project on every worker of a TPU slice and installs it there
# (`pip install -e '.[tfds,gcs]' 'jax[tpu]'`), then checks that each worker sees
# the slice's TPU chips. Rerun it after the slice is recreated (a preempted
# slice comes back with fresh disks). See launch/README.md.
set -euo pipefail
SCRIPT_NAME=tpu_setup.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tpu_common.sh
source "$HERE/tpu_common.sh"

SOURCE=copy
REPO=$(cd "$HERE/.." && pwd)
GIT_URL=""
GIT_REF=main
REMOTE_DIR=lt_calib
PYTHON=python3
EXTRAS=tfds,gcs
PACKAGES="jax[tpu]"
SKIP_CHECK=0

usage() {
  cat <<EOF
Usage: launch/tpu_setup.sh [flags]

Copies (or clones) the project to ~/REMOTE_DIR on every worker of the TPU
slice (gcloud compute tpus tpu-vm scp/ssh --worker=all), installs it with
pip, and prints each worker's view of the slice (process index, local and
global device counts: 0..3, 4, 16 on a v4-32).

Flags (default in brackets):
  --project P        Google Cloud project [gcloud's configured project]
  --zone Z           zone of the slice [$ZONE]
  --name N           TPU node name [$NAME]
  --source S         'copy': the local checkout's files (tracked and untracked,
                     not git-ignored ones); 'git': clone --git-url [$SOURCE]
  --repo DIR         local checkout to copy [$REPO]
  --git-url U        repository to clone on the workers (with --source=git)
  --git-ref R        branch, tag or commit to check out (with --source=git) [$GIT_REF]
  --remote-dir D     directory under the workers' home [$REMOTE_DIR]
  --python P         Python interpreter on the workers [$PYTHON]
  --extras E         extras of the project to install, comma-separated [$EXTRAS]
  --packages "L"     more pip requirements, space-separated [$PACKAGES]
  --skip-check       do not run the device check
  --dry-run          print the commands instead of running them
  -h, --help         this help
EOF
}

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --skip-check) SKIP_CHECK=1; shift ;;
    --project | --project=*) flag_value "$@"; PROJECT=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --zone | --zone=*) flag_value "$@"; ZONE=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --name | --name=*) flag_value "$@"; NAME=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --source | --source=*) flag_value "$@"; SOURCE=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --repo | --repo=*) flag_value "$@"; REPO=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --git-url | --git-url=*) flag_value "$@"; GIT_URL=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --git-ref | --git-ref=*) flag_value "$@"; GIT_REF=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --remote-dir | --remote-dir=*) flag_value "$@"; REMOTE_DIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --python | --python=*) flag_value "$@"; PYTHON=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --extras | --extras=*) flag_value "$@"; EXTRAS=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --packages | --packages=*) flag_value "$@"; PACKAGES=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    *) die "unknown flag $1 (see --help)." ;;
  esac
done
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] ||
  die "--remote-dir=$REMOTE_DIR must be a plain path under the home directory, e.g. lt_calib."
case $SOURCE in
  copy) [[ -e $REPO/.git ]] || die "--repo=$REPO is not a git checkout; give --repo or --source=git." ;;
  git) [[ -n $GIT_URL ]] || die "--source=git needs --git-url." ;;
  *) die "--source=$SOURCE is unknown; allowed: copy, git." ;;
esac
tpu_scope

on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${TPU_SCOPE[@]}" --worker=all --command "$1"
}

# shellcheck disable=SC2088  # ~ is left for each worker's shell to expand.
dir="~/$REMOTE_DIR"
if [[ $SOURCE == copy ]]; then
  tarball=${TMPDIR:-/tmp}/lt_calib_src_$NAME.tgz
  note "packing $REPO (tracked and untracked files, not git-ignored ones: no .venv, runs)"
  # --ignore-failed-read: files deleted but not yet committed are skipped.
  run_shell "git -C $(quote_word "$REPO") ls-files -z --cached --others --exclude-standard | tar -C $(quote_word "$REPO") --null --ignore-failed-read -T - -czf $(quote_word "$tarball")"
  note "copying it to every worker of $NAME"
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:lt_calib_src.tgz" "${TPU_SCOPE[@]}" --worker=all
  fetch="rm -rf $dir && mkdir -p $dir && tar -xzf ~/lt_calib_src.tgz -C $dir"
else
  fetch="rm -rf $dir && git clone --quiet $(quote_word "$GIT_URL") $dir && git -C $dir checkout --quiet $(quote_word "$GIT_REF")"
fi
requirements="-e $(quote_word ".${EXTRAS:+[$EXTRAS]}")"
for package in $PACKAGES; do
  requirements+=" $(quote_word "$package")"
done
note "installing on every worker of $NAME"
on_workers "set -e; $fetch && cd $dir && $(quote_word "$PYTHON") -m pip install --quiet $requirements"
if [[ $SKIP_CHECK == 0 ]]; then
  note "each worker: process index, local devices, global devices"
  on_workers "cd $dir && $(quote_word "$PYTHON") -c 'import jax, lt_calib; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
fi
