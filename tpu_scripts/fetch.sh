#!/usr/bin/env bash
# Copies a run's or a sweep's directory back: from a bucket, or from worker 0 of a TPU VM.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SRC=
DEST=.
EXCLUDE=

usage() {
  cat <<USAGE
Usage: $SCRIPT --from gs://BUCKET/DIR [--to LOCAL] [--exclude REGEX]
       $SCRIPT --from PATH --name NAME --zone ZONE --project PROJECT [--to LOCAL]

Copies DIR into LOCAL/DIR: from Cloud Storage with gcloud storage cp -r (gcloud storage rsync with
--exclude), or, for a workdir on the VM's disk, PATH (relative to the home directory, e.g. lm/runs/x)
from worker 0 with gcloud compute tpus tpu-vm scp --recurse. lm reads gs:// workdirs directly too:
lm scaling report gs://BUCKET/DIR needs no copy.

Fetch:
  --from SRC           gs://BUCKET/DIR, or a path on worker 0 (then --name, --zone, --project are needed)
  --to LOCAL           local directory, created if missing (default: .)
  --exclude REGEX      gs:// only: skip objects whose path below DIR matches REGEX (e.g. checkpoints)
$(help_common)

Example:
  $SCRIPT --from gs://my-bucket/isoflop_tpu --to results
USAGE
}

parse_opt() {
  case $1 in
    --from) need_value "$@"; SRC=${2%/}; SHIFT=2 ;;
    --to) need_value "$@"; DEST=$2; SHIFT=2 ;;
    --exclude) need_value "$@"; EXCLUDE=$2; SHIFT=2 ;;
    *) opt_common "$@" ;;
  esac
}
parse_args "$@"
require "$SRC" --from
if [[ $SRC != gs://* ]]; then
  [[ -z $EXCLUDE ]] || die "--exclude works with a gs:// source only"
  check_tpu_opts
fi
run mkdir -p "$DEST"
if [[ $SRC != gs://* ]]; then
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$SRC" "$DEST" --zone="$ZONE" --project="$PROJECT" --worker=0
elif [[ -n $EXCLUDE ]]; then
  run gcloud storage rsync --recursive --exclude="$EXCLUDE" "$SRC" "$DEST/$(basename "$SRC")"
else
  run gcloud storage cp -r "$SRC" "$DEST"
fi
