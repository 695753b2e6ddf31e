"""Damaged and uncommitted checkpoints, non-finite steps and a killed metrics writer."""

import glob
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import metrics as metrics_lib
from lm import partitioning, train
from lm import state as state_lib
from lm.errors import UserError

from conftest import tiny_config


def snapshot(root) -> dict:
  """Every path under `root` with its mtime and, for files, a hash of its bytes."""
  return {
    str(p.relative_to(root)): (p.stat().st_mtime_ns, p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest())
    for p in sorted(root.rglob("*"))
  }


def run_config(root, **overrides):
  values = {
    "data.source": f"text:{root / 'corpus.txt'}",
    "data.cache_dir": str(root / "cache"),
    "optim.schedule": "constant",
    "train.steps": 6,
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 10,
    "train.eval_every": 100,
    "train.debug_nan_steps": "3",
    "data.eval_min_tokens": 0,  # the tiny eval set is not what these tests are about
  }
  return tiny_config(**{**values, **overrides})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 6-step run whose step 3 gets a NaN-poisoned batch, with checkpoints after every step."""
  root = tmp_path_factory.mktemp("fault")
  (root / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox {i % 13}\n" for i in range(3000)))
  train.train(run_config(root), str(root / "run"), progress=False)
  return root, root / "run"


def copy_run(finished_run, tmp_path):
  _, run = finished_run
  shutil.copytree(run, tmp_path / "run")
  return tmp_path / "run"


def restore_steps(cfg, workdir, steps) -> dict:
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=10)
  abstract_state = state_lib.build(cfg, 264, partitioning.make_mesh(cfg)).abstract_state
  states = {s: jax.device_get(ckpt.restore(s, abstract_state)[0]) for s in steps}
  ckpt.close()
  return states


def restore_latest(finished_run, workdir):
  cfg = run_config(finished_run[0])
  setup = state_lib.build(cfg, 264, partitioning.make_mesh(cfg))
  with setup.context():
    return checkpoint_lib.restore_latest(str(workdir), setup.abstract_state)


def tree_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def largest_array_file(step_dir) -> str:
  return max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)


def truncate(path, size: int = 100) -> None:
  with open(path, "r+b") as f:
    f.truncate(size)


def overwrite(path, offset: int = 100) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(b"\0" * 256)


DAMAGE = {
  "array file truncated": lambda d: truncate(largest_array_file(d)),
  "array file deleted": lambda d: os.remove(largest_array_file(d)),
  "array bytes overwritten": lambda d: overwrite(largest_array_file(d)),
  "state manifest deleted": lambda d: os.remove(d / "state" / "manifest.ocdbt"),
  "state metadata garbage": lambda d: (d / "state" / "_METADATA").write_text("{garbage"),
  "data state garbage": lambda d: (d / "data" / "metadata").write_text("\x00\x01"),
  "run metadata truncated": lambda d: truncate(d / "meta" / "metadata", 3),
  "state item missing": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, damage):
  workdir = copy_run(finished_run, tmp_path)
  DAMAGE[damage](workdir / "checkpoints" / "6")
  before = snapshot(workdir)
  restored = restore_latest(finished_run, workdir)
  assert restored.step == 5 and [step for step, _ in restored.damaged] == [6], restored.damaged
  assert int(restored.state.step) + int(restored.state.skipped_steps) == 5 and restored.data_state
  assert snapshot(workdir) == before  # restoring writes nothing, and leaves the damaged one in place


def test_uncommitted_save_is_not_a_checkpoint(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  partial = workdir / "checkpoints" / "7.orbax-checkpoint-tmp"
  shutil.copytree(workdir / "checkpoints" / "6", partial)
  os.remove(largest_array_file(partial))
  restored = restore_latest(finished_run, workdir)
  assert restored.step == 6 and restored.damaged == []


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  for step in range(1, 7):
    truncate(largest_array_file(workdir / "checkpoints" / str(step)))
  before = snapshot(workdir)
  with pytest.raises(UserError, match=r"no checkpoint in .* can be restored \(step 6: .*; step 5: .*; step 1: "):
    restore_latest(finished_run, workdir)
  assert snapshot(workdir) == before


def test_resume_sets_a_damaged_checkpoint_aside_and_keeps_the_good_ones(finished_run, tmp_path, capfd):
  root, run = finished_run
  workdir = copy_run(finished_run, tmp_path)
  truncate(largest_array_file(workdir / "checkpoints" / "6"))
  damaged = snapshot(workdir / "checkpoints" / "6")
  capfd.readouterr()
  # keep_checkpoints=2: left among the checkpoints, the damaged 6 would block the new save of step 6,
  # and as one of the two newest it would make max_to_keep delete good ones.
  train.train(run_config(root, **{"train.steps": 8, "train.keep_checkpoints": 2}), str(workdir), progress=False)
  lines = capfd.readouterr().err.strip().splitlines()
  warnings = [line for line in lines if not line.startswith("lm: eval set ")]  # the eval set's size is said once
  assert len(warnings) == 1 and warnings[0].startswith("lm: warning: "), lines  # and nothing else on stderr
  assert f"checkpoint 6 in {workdir} is damaged" in warnings[0] and "resuming from checkpoint 5" in warnings[0]
  assert str(workdir / "damaged_checkpoints" / "6") in warnings[0]
  assert snapshot(workdir / "damaged_checkpoints" / "6") == damaged  # moved as it was, not deleted
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [7, 8]
  assert restore_latest(finished_run, workdir).step == 8
  rows = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in rows] == list(range(1, 9))
  original = {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(str(run))}
  assert {r["step"]: r["train/loss"] for r in rows if r["step"] <= 6} == original  # replayed step 6 exactly


def test_a_nonfinite_step_is_skipped_and_counted_and_training_goes_on(finished_run):
  root, run = finished_run
  rows = metrics_lib.read_metrics(str(run))
  assert [r["step"] for r in rows if r["train/loss"] is None or r["grad_norm"] is None] == [3]
  assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
  states = restore_steps(run_config(root), run, (2, 3, 4))
  assert tree_equal(states[2].params, states[3].params) and tree_equal(states[2].opt_state, states[3].opt_state)
  assert not tree_equal(states[3].params, states[4].params)  # training went on after the bad step
  assert [int(states[s].step) for s in (2, 3, 4)] == [2, 2, 3]  # updates applied; the schedule follows these
  assert [int(states[s].skipped_steps) for s in (2, 3, 4)] == [0, 1, 1]


def test_max_bad_steps_in_a_row_stop_the_run_and_leave_the_checkpoints_intact(finished_run, tmp_path):
  root, _ = finished_run
  workdir = copy_run(finished_run, tmp_path)
  cfg = run_config(root, **{"train.steps": 12, "train.debug_nan_steps": "3,8,9,10", "train.max_bad_steps": 3})
  with pytest.raises(UserError, match=r"steps 8-10 all had a non-finite loss .* the last checkpoint is 9"):
    train.train(cfg, str(workdir), progress=False)  # resumes from 6: the skipped count is in the checkpoint
  rows = metrics_lib.read_metrics(str(workdir))
  assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 2, 3, 4]
  # The state after the third bad step in a row is not saved; the checkpoints before it are intact.
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == list(range(1, 10))
  states = restore_steps(cfg, workdir, (7, 9))
  assert tree_equal(states[7].params, states[9].params) and tree_equal(states[7].opt_state, states[9].opt_state)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[9].params))


def test_metrics_ignore_a_killed_writers_partial_last_line(tmp_path):
  rows = [{"step": s, "tokens": s} for s in (1, 2, 3)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "tok')
  assert metrics_lib.read_metrics(str(tmp_path)) == rows
  metrics_lib.MetricsWriter(str(tmp_path), resume_step=2).close()
  assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage mid-file is no crash artefact
  with pytest.raises(UserError, match="metrics.jsonl:2: not a JSON row"):
    metrics_lib.read_metrics(str(tmp_path))
