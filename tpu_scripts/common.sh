# shellcheck shell=bash
# Sourced by every script in tpu_scripts/, never run. Holds option parsing, the `run` helper that
# DRY_RUN turns into printing, the gcloud calls, and the lm_* functions each TPU worker runs (shipped
# over ssh with `declare -f`, so they are plain bash that shellcheck reads like the rest).

SCRIPT=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Defaults from the environment; the flags of each script override them.
DRY_RUN=${DRY_RUN:-0}
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
QUEUED=${QUEUED:-0}
TPU_TYPE=${TPU_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
PROVISIONING=${PROVISIONING:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-HEAD}
REMOTE_DIR=${REMOTE_DIR:-lm}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
RUN_NAME=${RUN_NAME:-run}
POLL_SECONDS=${POLL_SECONDS:-300}
INSTALL_FROM=
WAIT=1
RESTART=0
GCLOUD_FLAGS=()
LAUNCH_ENV=()
LAUNCH_CMD=()

# --- messages and exits ---------------------------------------------------------------------------

note() { echo "$SCRIPT: $*" >&2; }
die() { note "$*"; exit 2; }  # a mistake in the command line: one line, status 2
fail() { note "$*"; exit 1; }

dry_run() { [[ $DRY_RUN != 0 ]]; }

# Prints its arguments as one shell-quoted line that can be pasted back into a shell.
quote() {
  local line
  printf -v line ' %q' "$@"
  echo "${line# }"
}

# Runs a command, or under DRY_RUN=1 prints it (one line, shell-quoted) instead.
run() {
  if dry_run; then
    quote "$@"
  else
    "$@"
  fi
}

# --- options --------------------------------------------------------------------------------------
# Each opt_* parses the option at "$@", sets SHIFT to the number of words it took and returns 0, or
# returns 1 if the option is not one of its own. A script chains the groups it accepts.

need_value() { (($# >= 2)) || die "$1 needs a value"; }

opt_common() {
  SHIFT=1
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name) need_value "$@"; TPU_NAME=$2; SHIFT=2 ;;
    --zone) need_value "$@"; ZONE=$2; SHIFT=2 ;;
    --project) need_value "$@"; PROJECT=$2; SHIFT=2 ;;
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

opt_create() {
  SHIFT=1
  case $1 in
    --type) need_value "$@"; TPU_TYPE=$2; SHIFT=2 ;;
    --runtime) need_value "$@"; RUNTIME_VERSION=$2; SHIFT=2 ;;
    --spot) PROVISIONING=spot ;;
    --preemptible) PROVISIONING=preemptible ;;
    --reserved) PROVISIONING=reserved ;;
    --gcloud-flag) need_value "$@"; GCLOUD_FLAGS+=("$2"); SHIFT=2 ;;
    --no-wait) WAIT=0 ;;
    *) return 1 ;;
  esac
}

opt_install() {
  SHIFT=1
  case $1 in
    --repo) need_value "$@"; REPO_URL=$2; SHIFT=2 ;;
    --ref) need_value "$@"; REPO_REF=$2; SHIFT=2 ;;
    --local) INSTALL_FROM=local ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; SHIFT=2 ;;
    --python) need_value "$@"; PYTHON_VERSION=$2; SHIFT=2 ;;
    *) return 1 ;;
  esac
}

opt_launch() {
  SHIFT=1
  case $1 in
    --run) need_value "$@"; RUN_NAME=$2; SHIFT=2 ;;
    --env) need_value "$@"; LAUNCH_ENV+=("$2"); SHIFT=2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; SHIFT=2 ;;
    --restart) RESTART=1 ;;
    --) LAUNCH_CMD=("${@:2}"); SHIFT=$# ;;
    *) return 1 ;;
  esac
}

# Parses all of "$@" with parse_opt, which each script defines by chaining opt_* groups.
parse_args() {
  while (($#)); do
    parse_opt "$@" || die "unknown option $1 (see $SCRIPT --help)"
    shift "$SHIFT"
  done
}

# require VALUE FLAG [ENV]: exits 2 naming the flag (and its environment variable) when VALUE is empty.
require() {
  [[ -n $1 ]] && return
  die "missing $2${3:+ (or $3)}"
}

check_tpu_opts() {
  require "$TPU_NAME" --name TPU_NAME
  require "$ZONE" --zone ZONE
  require "$PROJECT" --project PROJECT
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "bad --name $TPU_NAME: lowercase letters, digits and dashes"
}

check_create_opts() {
  require "$TPU_TYPE" --type TPU_TYPE
  [[ $TPU_TYPE =~ ^v[0-9][a-z]*-[0-9]+$ ]] || die "bad --type $TPU_TYPE: an accelerator type such as v5p-16 or v4-32"
  [[ -n $RUNTIME_VERSION ]] || RUNTIME_VERSION=$(default_runtime "$TPU_TYPE") \
    || die "no default runtime for $TPU_TYPE: pass --runtime"
  case $PROVISIONING in
    '' | spot | reserved) ;;
    preemptible) [[ $QUEUED == 0 ]] || die "--preemptible is for TPU VMs; a queued resource takes --spot" ;;
    *) die "bad PROVISIONING=$PROVISIONING: spot, preemptible or reserved" ;;
  esac
}

check_install_opts() {
  if [[ $INSTALL_FROM == local ]]; then
    [[ -z $REPO_URL ]] || die "--repo and --local exclude each other"
  else
    require "$REPO_URL" "--repo or --local" REPO_URL
    INSTALL_FROM=git
  fi
}

check_launch_opts() {
  [[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "bad --run $RUN_NAME: letters, digits, '.', '_' and '-'"
  ((${#LAUNCH_CMD[@]})) || die "missing the command to run, after -- (e.g. -- lm train --config FILE --workdir DIR)"
  local kv
  for kv in "${LAUNCH_ENV[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env $kv: NAME=VALUE"
  done
}

check_count() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "bad $1 $2: a positive integer"; }

# The runtime (software) version Google documents for JAX on each TPU generation.
default_runtime() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# --- gcloud ---------------------------------------------------------------------------------------
# With --queued the queued resource and its node share the name TPU_NAME.

tpu_create() {
  local cmd
  if [[ $QUEUED == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --zone="$ZONE"
      --project="$PROJECT" --accelerator-type="$TPU_TYPE" --runtime-version="$RUNTIME_VERSION")
  else
    cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
      --accelerator-type="$TPU_TYPE" --version="$RUNTIME_VERSION")
  fi
  [[ -z $PROVISIONING ]] || cmd+=("--$PROVISIONING")
  run "${cmd[@]}" "${GCLOUD_FLAGS[@]}" || return 1
  if [[ $QUEUED == 1 && $WAIT == 1 ]]; then
    wait_active || return 1
  fi
}

tpu_delete() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
  fi
}

state_cmd() {
  if [[ $QUEUED == 1 ]]; then
    STATE_CMD=(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
      --format='value(state.state)')
  else
    STATE_CMD=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
      --format='value(state)')
  fi
}

# Sets STATE to the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...) or the TPU
# VM's (READY, CREATING, PREEMPTED, ...), NOT_FOUND if it does not exist, UNKNOWN if gcloud failed
# otherwise. Under DRY_RUN=1 it prints the query and takes DRY_RUN_STATE (default: the running state).
query_state() {
  local out
  state_cmd
  if dry_run; then
    quote "${STATE_CMD[@]}"
    STATE=${DRY_RUN_STATE:-$(ready_state)}
  elif out=$("${STATE_CMD[@]}" 2>&1); then
    STATE=$(grep -m1 -E '^[A-Z_]+$' <<<"$out" || echo UNKNOWN)
  elif grep -q -e NOT_FOUND -e 'not found' <<<"$out"; then
    STATE=NOT_FOUND
  else
    note "cannot read the state of $TPU_NAME: $(tail -n1 <<<"$out")"
    STATE=UNKNOWN
  fi
}

ready_state() { if [[ $QUEUED == 1 ]]; then echo ACTIVE; else echo READY; fi; }

# Waits until the queued resource is ACTIVE (its TPU VM exists); under DRY_RUN=1 prints the query once.
wait_active() {
  if dry_run; then
    state_cmd
    quote "${STATE_CMD[@]}"
    return
  fi
  while :; do
    query_state
    case $STATE in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | NOT_FOUND) note "queued resource $TPU_NAME is $STATE"; return 1 ;;
    esac
    note "queued resource $TPU_NAME is $STATE; next check in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
  done
}

# tpu_ssh WORKER TEXT: runs the bash TEXT on worker WORKER (a number, or all).
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker="$1" --command="$2"
}

# remote_call FUNCTION ARGS...: bash text that defines the lm_* FUNCTION (with those it calls) and calls it.
remote_call() {
  local needs=()
  case $1 in
    lm_launch) needs=(lm_alive lm_run_state lm_wrapped) ;;
    lm_status) needs=(lm_alive lm_run_state) ;;
    lm_run_state) needs=(lm_alive) ;;
  esac
  declare -f "${needs[@]}" "$1"
  quote "$@"
}

install_project() {
  local text
  if [[ $INSTALL_FROM == local ]]; then
    local tarball=${TMPDIR:-/tmp}/lm-src-$TPU_NAME.tar.gz
    [[ -z $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]] \
      || note "copying the HEAD commit of $REPO_ROOT: uncommitted changes stay behind"
    run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" HEAD || return 1
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:lm-src.tar.gz" --zone="$ZONE" --project="$PROJECT" \
      --worker=all || return 1
    run rm -f "$tarball"
    text=$(remote_call lm_install tarball lm-src.tar.gz "" "$REMOTE_DIR" "$PYTHON_VERSION")
  else
    text=$(remote_call lm_install git "$REPO_URL" "$REPO_REF" "$REMOTE_DIR" "$PYTHON_VERSION")
  fi
  tpu_ssh all "$text"
}

# Starts LAUNCH_CMD on every worker; with RESTART=1 a copy still running is stopped first.
launch_run() {
  local cmd=("${LAUNCH_CMD[@]}")
  ((${#LAUNCH_ENV[@]} == 0)) || cmd=(env "${LAUNCH_ENV[@]}" "${cmd[@]}")
  tpu_ssh all "$(remote_call lm_launch "$RUN_NAME" "$REMOTE_DIR" "$RESTART" "${cmd[@]}")"
}

# --- run on the TPU workers -----------------------------------------------------------------------
# Each worker keeps a run's files in ~/lm_logs: RUN.log (output, appended per launch), RUN.pid (the
# run's process group) and RUN.status (written when the command ends).

# Whether process group $1 has a member that is not a zombie (an exited process not yet reaped).
lm_alive() {
  ps -A -o pgid=,stat= | awk -v group="$1" '$1 == group && $2 !~ /^Z/ { alive = 1 } END { exit !alive }'
}

# Prints the state of run $1: running, done, stopped (lm exited 0 after SIGTERM/SIGINT, checkpoint
# saved), failed N (exit status N), died (killed without a word, e.g. by a reboot) or none.
lm_run_state() {
  local base=$HOME/lm_logs/$1
  if [[ -s $base.pid ]] && lm_alive "$(<"$base.pid")"; then
    echo running
  elif [[ -f $base.status ]]; then
    cat "$base.status"
  elif [[ -f $base.pid ]]; then
    echo died
  else
    echo none
  fi
}

# lm_wrapped BASE CMD...: runs CMD in the venv of the current directory, then writes BASE.status.
lm_wrapped() {
  local base=$1 code=0 outcome='done' start
  shift
  echo "$$" >"$base.pid.new" && mv "$base.pid.new" "$base.pid"
  start=$(wc -c <"$base.log")  # this launch's output is what follows
  export VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH
  "$@" || code=$?
  if ((code != 0)); then
    outcome="failed $code"
  elif tail -c "+$((start + 1))" "$base.log" | grep -q 'stopped by SIG'; then
    outcome=stopped
  fi
  echo "$outcome" >"$base.status"
}

# lm_launch RUN DIR RESTART CMD...: starts CMD in ~/DIR detached (its own session, nohup), output
# appended to ~/lm_logs/RUN.log. A run still going is an error, or with RESTART=1 is sent SIGTERM
# (lm saves a checkpoint and exits) and waited for, up to 10 minutes.
lm_launch() {
  set -euo pipefail
  local run=$1 dir=$2 restart=$3 base=$HOME/lm_logs/$1 pid i
  shift 3
  mkdir -p "$HOME/lm_logs"
  if [[ $(lm_run_state "$run") == running ]]; then
    pid=$(<"$base.pid")
    if [[ $restart != 1 ]]; then
      echo "$(hostname): $run is already running (process group $pid); --restart stops it first" >&2
      return 1
    fi
    echo "$(hostname): stopping $run (SIGTERM to process group $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < 3000; i++)); do
      lm_alive "$pid" || break
      sleep 0.2
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$base.pid" "$base.status"
  cd "$HOME/$dir"
  echo "=== $(date -u +%FT%TZ) $(hostname): $*" >>"$base.log"
  export -f lm_wrapped
  setsid nohup bash -c 'lm_wrapped "$@"' lm-run "$base" "$@" >>"$base.log" 2>&1 </dev/null &
  for ((i = 0; i < 100; i++)); do
    [[ -f $base.pid ]] && break
    sleep 0.1
  done
  echo "$(hostname): started $run; log in $base.log"
}

# lm_status RUN LINES: the run's state and the last LINES lines of its log, under a header naming the host.
lm_status() {
  local log=$HOME/lm_logs/$1.log
  echo "=== $(hostname): $1 $(lm_run_state "$1")"
  if [[ -f $log ]]; then
    tail -n "$2" "$log"
  else
    echo "(no log at $log)"
  fi
}

# lm_install git URL REF DIR PYTHON | lm_install tarball FILE "" DIR PYTHON: puts the project in ~/DIR
# (a checkout of REF, or FILE unpacked over everything but the venv), then makes DIR/.venv with Python
# PYTHON (fetched by uv if the system lacks it) and installs the project there with its tpu extra.
lm_install() {
  set -euo pipefail
  local mode=$1 src=$2 ref=$3 dir=$4 python=$5
  cd "$HOME"
  if [[ $mode == git ]]; then
    [[ -d $dir/.git ]] || git clone --quiet "$src" "$dir"
    git -C "$dir" fetch --quiet origin "$ref"
    git -C "$dir" checkout --quiet --force --detach FETCH_HEAD
  else
    mkdir -p "$dir"
    find "$dir" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
    tar -xzf "$src" -C "$dir"
    rm -f "$src"
  fi
  python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet --user uv \
    || python3 -m pip install --quiet --user --break-system-packages uv
  [[ -x $dir/.venv/bin/python ]] || python3 -m uv venv --quiet --seed --python "$python" "$dir/.venv"
  cd "$dir"
  .venv/bin/pip install --quiet -e '.[tpu]'
  echo "$(hostname): installed in ~/$dir, $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)')"
}

# --- help -----------------------------------------------------------------------------------------

help_common() {
  cat <<'HELP'
Which TPU:
  --name NAME          TPU VM name; with --queued also the queued resource's  [TPU_NAME]
  --zone ZONE          e.g. us-east5-a                                        [ZONE]
  --project PROJECT    GCP project id                                         [PROJECT]
  --queued             the TPU belongs to a queued resource                   [QUEUED=1]
Always:
  --dry-run            print each command (one line, shell-quoted) instead of running it  [DRY_RUN=1]
  -h, --help           this help
HELP
}

help_create() {
  cat <<'HELP'
Create:
  --type TYPE          accelerator type: v4-32, v5p-16, v5litepod-16, v6e-8 ...  [TPU_TYPE]
  --runtime VERSION    TPU software version; default by generation: v2/v3/v4 tpu-ubuntu2204-base,
                       v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e  [RUNTIME_VERSION]
  --spot | --preemptible | --reserved
                       provisioning; --preemptible is TPU VM only  [PROVISIONING=spot|preemptible|reserved]
  --gcloud-flag FLAG   passed on to the gcloud create command (repeatable), e.g. --gcloud-flag --network=NET
  --no-wait            --queued: return once the request is accepted, not once it is ACTIVE
HELP
}

help_install() {
  cat <<'HELP'
Install (one of --repo, --local):
  --repo URL           git URL every worker clones  [REPO_URL]
  --ref REF            branch, tag or commit to check out (default: HEAD, the remote's default)  [REPO_REF]
  --local              copy this checkout's HEAD commit (git archive) to every worker instead
  --remote-dir DIR     the project's directory under each worker's home (default: lm)  [REMOTE_DIR]
  --python VERSION     Python of the venv DIR/.venv (default: 3.12)  [PYTHON_VERSION]
HELP
}

help_launch() {
  cat <<'HELP'
Launch:
  --run RUN            name of the run's files ~/lm_logs/RUN.{log,pid,status} (default: run)  [RUN_NAME]
  --env NAME=VALUE     environment variable for the command (repeatable)
  --restart            stop a copy of RUN still running (SIGTERM, lm checkpoints) before starting
  -- CMD...            the command, run in ~/DIR with DIR/.venv on PATH
HELP
}
