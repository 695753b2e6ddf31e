import dataclasses

import flax
import jax
import numpy as np

from lm import checkpoint as checkpoint_lib
from lm import partitioning
from lm import state as state_lib

from conftest import tiny_config


def test_state_data_and_meta_round_trip(tmp_path):
  cfg = tiny_config()
  setup = state_lib.build(cfg, 64, partitioning.make_mesh(cfg, jax.devices()[:1]))
  with setup.context():
    state = setup.init_state()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state.replace(step=state.step + step), {"parent": {"next_index": step}, "offset": 7}, {"k": step})
  ckpt.wait()
  assert ckpt.latest_step() == 3
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]  # keep=2
  restored, data_state, meta = ckpt.restore(3, setup.abstract_state)
  ckpt.close()
  assert int(restored.step) == 3
  assert data_state == {"parent": {"next_index": 3}, "offset": 7} and meta["k"] == 3
  assert meta["fingerprint"] == checkpoint_lib.fingerprint(restored)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(state.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.opt_state), jax.device_get(state.opt_state))
  assert restored.params["embed"].sharding == setup.state_shardings.params["embed"]


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint_lib.Checkpointer("relative_run")
  assert str(ckpt.directory) == str(tmp_path / "relative_run" / "checkpoints")
  ckpt.close()


def test_blob_round_trip():
  data = bytes(range(256))
  assert checkpoint_lib.decode_blob(checkpoint_lib.encode_blob(data)) == data


def test_a_checkpoint_saved_before_the_frozen_trees_restores(tmp_path):
  cfg = tiny_config()
  setup = state_lib.build(cfg, 64, partitioning.make_mesh(cfg, jax.devices()[:1]))
  with setup.context():
    state = setup.init_state()
  fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "frozen"}
  before = flax.struct.dataclass(type("TrainState", (), {"__annotations__": dict.fromkeys(fields, object)}))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  ckpt.save(4, before(**fields), {"batches": 4}, {})
  ckpt.close()
  with setup.context():
    restored = checkpoint_lib.restore_latest(str(tmp_path), setup.abstract_state)
  assert restored.step == 4 and not restored.damaged and restored.state.frozen == {}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state.params), jax.device_get(state.params))
