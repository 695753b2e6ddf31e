#!/usr/bin/env bash
# Deletes a TPU VM, or a queued resource with its TPU VM.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE --project PROJECT [--queued]

Deletes the TPU VM NAME (gcloud compute tpus tpu-vm delete), or with --queued the queued resource NAME
and its TPU VM (gcloud compute tpus queued-resources delete --force), without asking. Whatever was on
the VMs' disks is lost; a gs:// workdir is not touched.

$(help_common)

Environment: the variables in [brackets] give defaults.

Example:
  $SCRIPT --name lm-v5p --zone us-east5-a --project my-proj --queued
USAGE
}

parse_opt() { opt_common "$@"; }
parse_args "$@"
check_tpu_opts
tpu_delete
