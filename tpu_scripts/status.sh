#!/usr/bin/env bash
# Shows the TPU's state and, on every worker, the run's state and the end of its log.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TAIL_LINES=${TAIL_LINES:-20}

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE --project PROJECT [--run RUN] [--lines N] [options]

Prints the state of the TPU VM (or with --queued of the queued resource), then, if it is up, a header
per worker with the run's state (running, done, stopped, failed N, died or none) followed by the last N
lines of its ~/lm_logs/RUN.log.

$(help_common)
Status:
  --run RUN            the run launched by launch.sh (default: run)  [RUN_NAME]
  --lines N            lines of each worker's log (default: 20)  [TAIL_LINES]

Environment: the variables in [brackets] give defaults.

Example:
  $SCRIPT --name lm-v5p --zone us-east5-a --project my-proj --queued --run isoflop --lines 50
USAGE
}

parse_opt() {
  case $1 in
    --run) need_value "$@"; RUN_NAME=$2; SHIFT=2 ;;
    --lines) need_value "$@"; TAIL_LINES=$2; SHIFT=2 ;;
    *) opt_common "$@" ;;
  esac
}
parse_args "$@"
check_tpu_opts
check_count --lines "$TAIL_LINES"
query_state
dry_run || echo "$TPU_NAME: $STATE"
if [[ $STATE == "$(ready_state)" ]]; then
  tpu_ssh all "$(remote_call lm_status "$RUN_NAME" "$TAIL_LINES")"
fi
