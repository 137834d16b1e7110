# Helpers sourced by launch/tpu_*.sh and launch/gpu_multinode.sh (not run by itself).
# shellcheck disable=SC2034  # Sets variables for the scripts that source it.
#
# Every command that touches the cloud or another machine goes through `run`
# (or `query`, for commands whose answer steers the script). With DRY_RUN=1
# they are printed, one shell-quoted line each, instead of being run, so the
# printed text is itself a script of what would happen; progress notes are
# printed as `# ...` comments. Without --dry-run, notes go to stderr.
#
# The dry run writes to fd 3, the script's stdout, so that commands printed
# inside $(...) (the queries) still reach the terminal in order.

exec 3>&1
DRY_RUN=${DRY_RUN:-0}
SCRIPT_NAME=${SCRIPT_NAME:-$(basename "$0")}
# The slice the tpu_*.sh scripts address unless --project/--zone/--name say
# otherwise.
PROJECT=${CLOUDSDK_CORE_PROJECT:-}
ZONE=us-central2-b
NAME=lt-calib

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 2
}

note() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "# $*" >&3
  else
    echo "[$SCRIPT_NAME $(date -u +%H:%M:%S)] $*" >&2
  fi
}

# Quotes one word for bash: bare when it is safe; in double quotes when it
# holds single quotes but nothing that double quotes would expand; else in
# single quotes. `--flag=value` keeps the flag bare: --format='value(x)'.
quote_word() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--[A-Za-z0-9-]+=)(.+)$ ]]; then
    printf '%s%s' "${BASH_REMATCH[1]}" "$(quote_word "${BASH_REMATCH[2]}")"
  elif [[ $word == *"'"* && $word != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_command() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote_word "$word")"
  done
  printf '%s\n' "$out"
}

# Runs "$@", or prints it under --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_command "$@" >&3
  else
    "$@"
  fi
}

# Runs a local shell pipeline given as one string, or prints it as it is.
run_shell() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$1" >&3
  else
    bash -c "$1"
  fi
}

# query ANSWER CMD...: runs CMD and prints its stdout; under --dry-run prints
# the command line and answers ANSWER, what the dry run pretends CMD printed.
query() {
  local answer=$1
  shift
  if [[ $DRY_RUN == 1 ]]; then
    quote_command "$@" >&3
    printf '%s\n' "$answer"
  else
    "$@"
  fi
}

# query_status STATUS CMD...: the exit status of CMD (STATUS under --dry-run).
query_status() {
  local status=$1
  shift
  if [[ $DRY_RUN == 1 ]]; then
    quote_command "$@" >&3
    return "$status"
  fi
  "$@"
}

# Hosts (TPU VM workers) of an accelerator type. v2/v3/v4/v5p names count
# TensorCores, 8 per host (4 chips of 2 cores): v4-32 = 16 chips = 4 hosts.
# v5e/v6e names count chips, 4 per host in multi-host slices (8-chip slices
# are one host).
tpu_hosts() {
  local type=$1 gen count
  gen=${type%-*}
  count=${type##*-}
  [[ $count =~ ^[0-9]+$ ]] || die "--accelerator-type=$type: expected NAME-COUNT, e.g. v4-32."
  case $gen in
    v2 | v3 | v4 | v5p) echo $(((count + 7) / 8)) ;;
    v5litepod | v5e | v6e) if ((count <= 8)); then echo 1; else echo $((count / 4)); fi ;;
    *) die "--accelerator-type=$type: unknown TPU generation '$gen' (v2, v3, v4, v5p, v5litepod, v6e)." ;;
  esac
}

# The flags naming one TPU for gcloud: --zone and, when given, --project.
tpu_scope() {
  TPU_SCOPE=(--zone="$ZONE")
  if [[ -n ${PROJECT:-} ]]; then
    TPU_SCOPE+=(--project="$PROJECT")
  fi
}

# Reads `--flag value` or `--flag=value`; sets FLAG_VALUE and FLAG_SHIFT.
flag_value() {
  local arg=$1
  if [[ $arg == *=* ]]; then
    FLAG_VALUE=${arg#*=}
    FLAG_SHIFT=1
  else
    [[ $# -ge 2 ]] || die "$arg needs a value (see --help)."
    FLAG_VALUE=$2
    FLAG_SHIFT=2
  fi
}

# trainer_flag NAME ARGS...: the value of --config.NAME=VALUE among ARGS (the
# last one wins, as in absl), or nothing.
trainer_flag() {
  local name=$1 value="" arg
  shift
  for arg in "$@"; do
    if [[ $arg == --config.$name=* ]]; then
      value=${arg#*=}
    fi
  done
  printf '%s' "$value"
}

# check_streaming_data CONFIG TRAINER_FLAGS...: refuses, before any cloud
# call, a streaming config (ImageNet-LT, iNaturalist, image lists) whose data
# every worker of a slice cannot read: the lists (dataset.split_dir) and the
# images (dataset.image_root, or dataset.tfds_data_dir with
# dataset.source=tfds) must be on gs://. The config file's own defaults are
# local or empty, so the flags must say where the data is.
check_streaming_data() {
  local config=$1 name
  shift
  name=$(trainer_flag dataset.name "$@")
  if [[ -z $name ]]; then
    name=$(basename "${config%%:*}" .py)
  fi
  case $name in
    imagenet_lt | inat2018 | image_list) ;;
    *) return 0 ;;
  esac
  local fields=(dataset.split_dir) missing=() field value
  if [[ $(trainer_flag dataset.source "$@") == tfds ]]; then
    fields+=(dataset.tfds_data_dir)
  else
    fields+=(dataset.image_root)
  fi
  for field in "${fields[@]}"; do
    value=$(trainer_flag "$field" "$@")
    [[ $value == gs://?* ]] || missing+=("--config.$field=gs://...${value:+ (got $value)}")
  done
  if ((${#missing[@]})); then
    die "$config streams its data from split lists, which every worker must read: pass ${missing[*]} after -- (see launch/README.md, 'Data on Cloud Storage')."
  fi
}
