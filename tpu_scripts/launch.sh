#!/usr/bin/env bash
# Starts the same command on every worker of a TPU VM, detached, with a log per worker.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE --project PROJECT [--run RUN] [options] -- CMD...

Runs CMD on every worker (gcloud compute tpus tpu-vm ssh --worker=all) in ~/DIR with DIR/.venv on PATH,
detached (setsid nohup), output appended to ~/lm_logs/RUN.log on each worker. When CMD ends it writes
~/lm_logs/RUN.status: done, stopped (lm saved a checkpoint after SIGTERM) or failed N. lm train calls
jax.distributed.initialize() itself on a TPU VM: it needs no coordinator flags there.

$(help_common)
$(help_launch)

Environment: the variables in [brackets] give defaults.

Example:
  $SCRIPT --name lm-v5p --zone us-east5-a --project my-proj --run isoflop --env LM_DATA_DIR=gs://BUCKET/tfds \\
    -- lm sweep --config experiments/isoflop_tpu.py --workdir gs://BUCKET/isoflop_tpu --no-progress
USAGE
}

parse_opt() { opt_launch "$@" || opt_common "$@"; }
parse_args "$@"
check_tpu_opts
check_launch_opts
launch_run
