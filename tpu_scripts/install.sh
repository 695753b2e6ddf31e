#!/usr/bin/env bash
# Installs the project on every worker of a TPU VM: source, venv, `pip install -e '.[tpu]'`.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE --project PROJECT (--repo URL [--ref REF] | --local) [options]

On every worker (gcloud compute tpus tpu-vm ssh --worker=all): puts the project in ~/DIR, from a git
clone or from this checkout's HEAD commit (git archive, then gcloud compute tpus tpu-vm scp --worker=all),
makes the venv DIR/.venv (uv provides the Python if the system lacks it) and runs pip install -e '.[tpu]'
there. Running it again updates the source and the install.

$(help_common)
$(help_install)

Environment: the variables in [brackets] give defaults.

Example:
  $SCRIPT --name lm-v5p --zone us-east5-a --project my-proj --repo https://github.com/ORG/lm.git --ref main
USAGE
}

parse_opt() { opt_install "$@" || opt_common "$@"; }
parse_args "$@"
check_tpu_opts
check_install_opts
install_project
