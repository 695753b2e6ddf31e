"""Multi-process runs: JAX's multi-controller runtime, started and stopped so that no process hangs.

Every process runs the same `lm train` command. On a Cloud TPU VM `jax.distributed.initialize()`
finds its peers by itself. Elsewhere (GPU nodes, or several CPU processes on one machine) each
process is told the coordinator, the process count and its own index, by flags or environment:

  --coordinator HOST:PORT   LM_COORDINATOR     process 0 listens there; the others connect to it
  --num-processes N         LM_NUM_PROCESSES
  --process-id I            LM_PROCESS_ID      0 .. N-1
  --dist-timeout SECONDS    LM_DIST_TIMEOUT    how long to wait for all processes (default 300)

The number of devices of each process is the platform's business (on CPU: JAX_NUM_CPU_DEVICES or
XLA_FLAGS=--xla_force_host_platform_device_count); nothing here overrides it.

Stopping together. A process that fails posts its error to the coordinator's key-value store and
exits at once; a watcher thread in every other process sees it within a second and exits too,
naming the failed process. A process that dies without a word (SIGKILL, out of memory) is noticed
by the runtime's heartbeat after `--dist-timeout` at most, and the others are terminated by it.
A coordinator that cannot be reached, or peers that never join, end in a one-line error after
`--dist-timeout` seconds, never in a hang.
"""

import json
import os
import socket
import sys
import threading
import time

from lm.errors import UserError

ENV = {"coordinator": "LM_COORDINATOR", "num_processes": "LM_NUM_PROCESSES", "process_id": "LM_PROCESS_ID"}
DEFAULT_TIMEOUT = 300
_FAILED = "lm/failed/"
_state = {"active": False, "process_id": 0}


def add_flags(parser) -> None:
  g = parser.add_argument_group("multi-process runs (automatic on Cloud TPU VMs)")
  g.add_argument("--coordinator", metavar="HOST:PORT", help=f"process 0's address (${ENV['coordinator']})")
  g.add_argument("--num-processes", type=int, help=f"processes in the run (${ENV['num_processes']})")
  g.add_argument("--process-id", type=int, help=f"this process, 0..N-1 (${ENV['process_id']})")
  g.add_argument(
    "--dist-timeout",
    type=float,
    default=None,
    metavar="SECONDS",
    help=f"wait this long for every process to join or answer (default {DEFAULT_TIMEOUT}; $LM_DIST_TIMEOUT)",
  )


def google_tpu_present() -> bool:
  """Whether this machine has Google TPU chips on its PCI bus (the test JAX itself makes)."""
  root = "/sys/bus/pci/devices"
  try:
    devices = os.listdir(root)
  except OSError:
    return False
  for device in devices:
    try:
      with open(f"{root}/{device}/vendor") as f:
        if f.read().strip() == "0x1ae0":
          return True
    except OSError:
      continue
  return False


def _setting(value, name: str, kind):
  if value is not None:
    return value
  text = os.environ.get(ENV[name], "").strip()
  if not text:
    return None
  try:
    return kind(text)
  except ValueError:
    raise UserError(f"${ENV[name]} must be {kind.__name__}, got {text!r}") from None


def initialize(coordinator=None, num_processes=None, process_id=None, timeout=None) -> None:
  """Starts the distributed runtime if this is a multi-process run; a single process needs nothing."""
  coordinator = _setting(coordinator, "coordinator", str)
  num_processes = _setting(num_processes, "num_processes", int)
  process_id = _setting(process_id, "process_id", int)
  if timeout is None:
    timeout = _timeout()
  os.environ["LM_DIST_TIMEOUT"] = str(timeout)  # for the waits of a running job
  given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
  if all(v is None for v in given.values()):
    if google_tpu_present():
      import jax  # noqa: PLC0415

      jax.distributed.initialize()  # TPU VMs describe their slice to JAX themselves
      _start(jax.process_index())
    return
  missing = [k for k, v in given.items() if v is None]
  if missing and given["--num-processes"] != 1:
    raise UserError(f"a multi-process run needs {', '.join(missing)} too (or the {', '.join(ENV.values())} variables)")
  if num_processes < 1:
    raise UserError(f"--num-processes must be at least 1, got {num_processes}")
  if num_processes == 1:
    return
  if not 0 <= process_id < num_processes:
    raise UserError(f"--process-id must be in [0, {num_processes - 1}], got {process_id}")
  host, port = _split_address(coordinator)
  if timeout <= 0:
    raise UserError(f"--dist-timeout must be positive, got {timeout}")
  who = f"process {process_id} of {num_processes}"
  if process_id != 0:
    _wait_for_port(host, port, timeout, who)
  # The runtime aborts the process (no exception) if peers do not join in time: a timer of our own
  # says why and exits first.
  timer = threading.Timer(
    timeout,
    _exit_with,
    (
      2,
      f"{who}: not all {num_processes} processes joined the run at {coordinator} within {timeout:g} s; "
      "start every process with the same --coordinator and --num-processes (see --dist-timeout)",
    ),
  )
  timer.daemon = True
  timer.start()
  import jax  # noqa: PLC0415

  jax.distributed.initialize(
    coordinator_address=coordinator,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=int(timeout) + 30,
    heartbeat_timeout_seconds=max(int(timeout), 10),
  )
  timer.cancel()
  _start(process_id)


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"--coordinator must be HOST:PORT, got {address!r}")
  return host.strip("[]"), int(port)


def _wait_for_port(host: str, port: int, timeout: float, who: str) -> None:
  """Waits until the coordinator accepts connections, or raises UserError after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise UserError(
          f"{who}: cannot reach the coordinator at {host}:{port} within {timeout:g} s ({e.strerror or e}); "
          "is process 0 running, and is the port open?"
        ) from None
      time.sleep(0.5)


def _start(process_id: int) -> None:
  _state.update(active=True, process_id=process_id)
  threading.Thread(target=_watch_for_failures, name="lm-failure-watch", daemon=True).start()


def process_id() -> int:
  return _state["process_id"]


def active() -> bool:
  """Whether this process is one of several in a run."""
  return _state["active"]


def is_lead() -> bool:
  """Whether this process writes the run's files and console output (process 0 of a multi-process run)."""
  import jax  # noqa: PLC0415 (this module is imported before JAX may start)

  return jax.process_index() == 0


def _client():
  from jax._src import distributed  # noqa: PLC0415 (the coordinator's key-value store has no public API)

  return distributed.global_state.client


def _watch_for_failures() -> None:
  me = _state["process_id"]
  while True:
    time.sleep(0.5)
    try:
      entries = _client().key_value_dir_get(_FAILED)
    except Exception:  # noqa: BLE001 (the runtime is shutting down)
      return
    others = [(key, value) for key, value in entries if key.rsplit("/", 1)[-1] != str(me)]
    if others:
      key, message = sorted(others)[0]
      _shutdown_and_exit(1, f"process {me}: stopping because process {key.rsplit('/', 1)[-1]} failed: {message}")


def fail(message: str, status: int) -> None:
  """Tells the other processes this one failed with `message`, and exits with `status` once they stop too.

  Every process leaves through the runtime's shutdown barrier, reached from the watcher thread in the
  others (their main threads may be stuck in a collective with this one); a process that simply
  exited would make the runtime abort the rest.
  """
  try:
    _client().key_value_set(_FAILED + str(_state["process_id"]), message, allow_overwrite=True)
  except Exception:  # noqa: BLE001 (the coordinator itself may be gone; exiting is all that is left)
    pass
  _shutdown_and_exit(status, f"process {_state['process_id']}: {message}")


def _shutdown_and_exit(status: int, message: str) -> None:
  print(f"lm: error: {message}", file=sys.stderr, flush=True)
  try:
    _client().shutdown()
  except Exception:  # noqa: BLE001 (a peer died without a word: nothing to wait for)
    pass
  _exit_with(status, None)


def barrier(name: str) -> None:
  """Waits until every process gets here, through the coordinator (no device collective, so no gloo timeout)."""
  if _state["active"]:
    _client().wait_at_barrier(f"lm/{name}", int(_timeout() * 1000))


def gather_json(name: str, value) -> list | None:
  """Process 0 gets every process's JSON-serializable `value`, in process order; the others get None.

  Through the coordinator's key-value store: no device, so nothing waits for queued steps.
  """
  if not _state["active"]:
    return [value]
  import jax  # noqa: PLC0415

  client, me = _client(), _state["process_id"]
  client.key_value_set(f"lm/{name}/{me}", json.dumps(value))
  if me != 0:
    return None
  values = []
  for p in range(jax.process_count()):
    key = f"lm/{name}/{p}"
    values.append(json.loads(client.blocking_key_value_get(key, int(_timeout() * 1000))))
    client.key_value_delete(key)
  return values


def _timeout() -> float:
  return float(os.environ.get("LM_DIST_TIMEOUT", DEFAULT_TIMEOUT))


def _exit_with(status: int, message: str | None) -> None:
  if message:
    print(f"lm: error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)
