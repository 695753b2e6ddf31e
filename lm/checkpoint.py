"""Orbax checkpoints of a run: train state, data-iterator state and run metadata.

Each checkpoint step directory holds three items:
- `state`: params, optimizer state, counters and RNG key (global arrays, saved asynchronously);
- `data`: the grain iterator state (JSON), so a resumed run sees the same batches;
- `meta`: the config and the tokenizer (JSON), so a checkpoint alone can rebuild the run.

A step directory appears only once all of its items are written (orbax writes into a temporary
directory and renames it), so a run killed mid-save leaves its older checkpoints as they were.
`meta` also holds a fingerprint of the state, which restore checks: orbax's compressed chunks can
decode from damaged bytes without an error.
"""

import base64
import contextlib
import dataclasses
import gc
import inspect
import logging
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from lm.errors import UserError


def checkpoint_dir(workdir: str) -> epath.Path:
  root = epath.Path(workdir) if "://" in workdir else epath.Path(workdir).absolute()  # orbax wants absolute paths
  return root / "checkpoints"


class Checkpointer:
  """An async `CheckpointManager` under `workdir/checkpoints`, keeping the newest `keep`.

  Temporary directories of saves that never committed (the process was killed) are removed.
  """

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
    meta = {**meta, "fingerprint": fingerprint(state)}
    args = ocp.args.Composite(
      state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
    )
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state) -> tuple[object, dict, dict]:
    """(state, data_state, meta) at `step`; `abstract_state` carries shapes and shardings."""
    return _restore(self.manager, step, abstract_state)

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


@jax.jit
def _leaf_sums(tree) -> jax.Array:
  def bits(x):
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)

  return jnp.stack([jnp.sum(bits(x), dtype=jnp.uint32) for x in jax.tree.leaves(tree)])


def fingerprint(tree) -> list[int]:
  """Per leaf, the sum of its elements' bit patterns modulo 2**32: exact, so the same on any mesh."""
  return [int(x) for x in jax.device_get(_leaf_sums(tree))]


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[object, dict, dict]:
  # A partial restore reads the leaves `abstract_state` has, so a state that gained an empty subtree (the
  # `frozen` trees of an objective without any) restores checkpoints saved before it; the fingerprint still
  # checks that they are all the checkpoint holds.
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
  state = ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args, partial_restore=True)
  args = ocp.args.Composite(state=state, data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
  restored = manager.restore(step, args=args)
  return restored.state, restored.data, restored.meta


@dataclasses.dataclass
class Restored:
  """The newest checkpoint that restored, its items, and the newer ones that did not, as (step, reason)."""

  step: int
  state: Any
  data_state: dict
  damaged: list[tuple[int, str]]
  meta: dict = dataclasses.field(default_factory=dict)


def restore_latest(
  workdir: str,
  abstract_state,
  check_meta: Callable[[int, dict], None] = lambda step, meta: None,
  only_step: int | None = None,
) -> Restored | None:
  """Restores the newest readable checkpoint of `workdir`, falling back to older ones; writes nothing.

  A checkpoint is damaged if any of its items fails to restore (missing or truncated files,
  unreadable metadata) or its state does not match its fingerprint. `check_meta(step, meta)`
  may raise a UserError for a readable checkpoint that does not belong to this run. Returns None
  if there is no checkpoint; raises UserError if there are some but none restores. With `only_step`,
  only that checkpoint is tried (None if it does not exist).
  """
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return None
  damaged = []
  with _quiet_failed_reads():
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      for step in sorted(manager.all_steps(), reverse=True):
        if only_step is not None and step != only_step:
          continue
        try:
          meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # any failure to read a checkpoint makes it damaged, whatever raised it
          damaged.append((step, _reason(e)))
          continue
        check_meta(step, meta)
        try:
          state, data_state, meta = _restore(manager, step, abstract_state)
        except Exception as e:
          damaged.append((step, _reason(e)))
          continue
        if fingerprint(state) != meta.get("fingerprint"):
          damaged.append((step, "its arrays do not match the fingerprint saved with them"))
          continue
        return Restored(step, state, data_state, damaged, meta)
    finally:
      manager.close()
      if damaged:
        _await_abandoned_reads()
  if damaged:
    reasons = "; ".join(f"step {step}: {reason}" for step, reason in damaged)
    raise UserError(f"no checkpoint in {directory} can be restored ({reasons}); move them away to start afresh")
  return None


@contextlib.contextmanager
def _quiet_failed_reads():
  """Silences the echoes of a failed restore: orbax leaves its other reads pending, to fail again when collected."""
  hook, asyncio_log = sys.unraisablehook, logging.getLogger("asyncio")
  level = asyncio_log.level
  sys.unraisablehook = lambda _: None
  asyncio_log.setLevel(logging.CRITICAL)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited"
      try:
        yield
      finally:
        gc.collect()
  finally:
    sys.unraisablehook = hook
    asyncio_log.setLevel(level)


def _await_abandoned_reads(timeout_s: float = 10.0) -> None:
  """Waits until the reads that a failed orbax restore left running have ended, so they end while silenced."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    gc.collect()
    if not any(inspect.iscoroutine(o) and "orbax" in o.cr_code.co_filename for o in gc.get_objects()):
      return
    time.sleep(0.05)


def _reason(e: Exception) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {first[:160]}"


def set_aside(workdir: str, step: int) -> epath.Path:
  """Moves checkpoint `step` to `workdir/damaged_checkpoints/`, out of orbax's sight; returns where.

  Left in place, it would block a new save of its step, and as the newest checkpoint its presence
  would make `max_to_keep` delete good older ones.
  """
  source = checkpoint_dir(workdir) / str(step)
  target_dir = epath.Path(workdir).absolute() / "damaged_checkpoints"
  target_dir.mkdir(parents=True, exist_ok=True)
  target, n = target_dir / str(step), 1
  while target.exists():
    target, n = target_dir / f"{step}.{n}", n + 1
  source.rename(target)
  return target


def encode_blob(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


def decode_blob(text: str) -> bytes:
  return base64.b64decode(text.encode("ascii"))
