#!/usr/bin/env bash
# Keeps a run going on preemptible TPUs: recreates, reinstalls and relaunches until the run is done.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
RESTART=1  # a relaunch first stops whatever is left of the previous attempt on any worker

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE --project PROJECT --type TYPE (--repo URL | --local) [options] -- CMD...

Every POLL seconds, reads the state of the TPU VM (or with --queued of the queued resource):
  PREEMPTED, TERMINATED, FAILED, SUSPENDED or gone
              delete it (unless gone), create it again, install, launch CMD as RUN
  READY (TPU VM) or ACTIVE (queued resource): ask worker 0 how RUN is doing
    done      exit 0: CMD ended with status 0 and no "stopped by SIG..." line
    running   wait
    stopped, died
              launch CMD again (the TPU is up: lm was stopped by a signal, or killed)
    none      install and launch (nothing was launched on this TPU yet)
    failed N  exit 1: CMD itself failed, and running it again would not help
  anything else (CREATING, WAITING_FOR_RESOURCES, SUSPENDING, ...): wait
Each recreate or relaunch is an attempt; after --max-attempts the script gives up (exit 1). CMD must
resume where it stopped, as lm train and lm sweep do from their workdir: use a gs:// workdir, since a
recreated VM starts with an empty disk. Start it in tmux or with nohup: it runs until the run is done.

$(help_common)
$(help_create | grep -v -e --no-wait)
$(help_install)
$(help_launch | grep -v -e --restart)
Recover:
  --poll SECONDS       seconds between checks (default: 300)  [POLL_SECONDS]
  --max-attempts N     recreates plus relaunches before giving up (default: 20)  [MAX_ATTEMPTS]

Environment: the variables in [brackets] give defaults. DRY_RUN=1 runs one check only, printing the
commands; the state it reads is DRY_RUN_STATE (default READY, or ACTIVE with --queued) and the run's
state on worker 0 is DRY_RUN_RUN_STATUS (default running), so that each branch can be tried, e.g.
  DRY_RUN=1 DRY_RUN_STATE=PREEMPTED $SCRIPT ...   prints delete, create, install and launch.

Example:
  $SCRIPT --name lm-v5p --zone us-east5-a --project my-proj --queued --type v5p-16 --spot \\
    --repo https://github.com/ORG/lm.git --run isoflop --env LM_DATA_DIR=gs://BUCKET/tfds \\
    -- lm sweep --config experiments/isoflop_tpu.py --workdir gs://BUCKET/isoflop_tpu --no-progress
USAGE
}

parse_opt() {
  case $1 in
    --poll) need_value "$@"; POLL_SECONDS=$2; SHIFT=2 ;;
    --max-attempts) need_value "$@"; MAX_ATTEMPTS=$2; SHIFT=2 ;;
    --no-wait | --restart) die "$1 does not apply: $SCRIPT always waits for a queued resource and restarts" ;;
    *) opt_launch "$@" || opt_install "$@" || opt_create "$@" || opt_common "$@" ;;
  esac
}

# Sets RUN_STATUS to what worker 0 says of RUN (see lm_run_state in common.sh), or unreachable.
query_run_status() {
  local text out
  text=$(remote_call lm_run_state "$RUN_NAME")
  if dry_run; then
    tpu_ssh 0 "$text"
    RUN_STATUS=${DRY_RUN_RUN_STATUS:-running}
  elif out=$(tpu_ssh 0 "$text" 2>/dev/null); then
    RUN_STATUS=$(tail -n1 <<<"$out")
  else
    RUN_STATUS=unreachable
  fi
}

attempts=0
next_attempt() {
  attempts=$((attempts + 1))
  ((attempts <= MAX_ATTEMPTS)) || fail "gave up after $MAX_ATTEMPTS attempts"
  note "attempt $attempts/$MAX_ATTEMPTS: $*"
}

# Each step stops the attempt on failure (no capacity, ssh down, ...); the next check tries again.
recreate() {
  if [[ $STATE != NOT_FOUND ]]; then
    tpu_delete || return 1
  fi
  tpu_create && install_project && launch_run
}

# One check of the TPU and the run; exits when the run is done or cannot go on.
check() {
  query_state
  case $STATE in
    PREEMPTED | TERMINATED | FAILED | SUSPENDED | NOT_FOUND)
      next_attempt "$TPU_NAME is $STATE: recreating it"
      recreate || note "attempt $attempts failed"
      ;;
    READY | ACTIVE)
      query_run_status
      case $RUN_STATUS in
        'done') note "$RUN_NAME is done"; exit 0 ;;
        running) note "$RUN_NAME is running" ;;
        stopped | died)
          next_attempt "$RUN_NAME $RUN_STATUS on a live TPU: launching it again"
          launch_run || note "attempt $attempts failed"
          ;;
        none)
          next_attempt "$RUN_NAME was never launched on $TPU_NAME: installing and launching"
          { install_project && launch_run; } || note "attempt $attempts failed"
          ;;
        failed*) fail "$RUN_NAME $RUN_STATUS on worker 0; status.sh shows its log" ;;
        *) note "cannot reach worker 0 ($RUN_STATUS)" ;;
      esac
      ;;
    *) note "$TPU_NAME is $STATE" ;;
  esac
}

parse_args "$@"
check_tpu_opts
check_create_opts
check_install_opts
check_launch_opts
check_count --poll "$POLL_SECONDS"
check_count --max-attempts "$MAX_ATTEMPTS"
while :; do
  check
  if dry_run; then
    note "dry run: one check only"
    exit 0
  fi
  sleep "$POLL_SECONDS"
done
