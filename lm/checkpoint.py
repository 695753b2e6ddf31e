"""Orbax checkpoints of a run: train state, data-iterator state and run metadata.

Each checkpoint step directory holds three items:
- `state`: params, optimizer state, step and RNG key (global arrays, saved asynchronously);
- `data`: the grain iterator state (JSON), so a resumed run sees the same batches;
- `meta`: the config and the tokenizer (JSON), so a checkpoint alone can rebuild the run.
"""

import base64

import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """An async `CheckpointManager` under `workdir/checkpoints`, keeping the newest `keep`."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = epath.Path(workdir).absolute() / "checkpoints" if "://" not in workdir else epath.Path(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
    )
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state) -> tuple[object, dict, dict]:
    """(state, data_state, meta) at `step`; `abstract_state` carries shapes and shardings."""
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
    )
    restored = self.manager.restore(step, args=args)
    return restored.state, restored.data, restored.meta

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def encode_blob(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


def decode_blob(text: str) -> bytes:
  return base64.b64decode(text.encode("ascii"))
