#!/usr/bin/env bash
# Creates a TPU VM, or a queued resource holding one.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE --project PROJECT --type TYPE [options]

Creates the TPU VM NAME (gcloud compute tpus tpu-vm create), or with --queued the queued resource NAME
with node NAME (gcloud compute tpus queued-resources create), then waits until the request is ACTIVE.

$(help_common)
$(help_create)

Environment: the variables in [brackets] give defaults; POLL_SECONDS (default 300) paces the wait.

Example:
  $SCRIPT --name lm-v5p --zone us-east5-a --project my-proj --type v5p-16 --spot --queued
USAGE
}

parse_opt() { opt_create "$@" || opt_common "$@"; }
parse_args "$@"
check_tpu_opts
check_create_opts
check_count POLL_SECONDS "$POLL_SECONDS"
tpu_create
