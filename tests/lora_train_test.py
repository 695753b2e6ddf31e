"""LoRA runs through the one loop: adapters trained on a base run's frozen weights, checkpoints that hold the
adapters and a pointer to the base, exact resume after SIGKILL, and `lm lora merge` into a plain run."""

import json
import shutil
import signal

import jax
import numpy as np
import pytest
from resume_test import experiment, finish, lm_train, logged, signal_when  # noqa: F401 (experiment: a fixture)

from lm import checkpoint as checkpoint_lib
from lm import cli, lora, partitioning, train
from lm import config as config_lib
from lm import metrics as metrics_lib
from lm import state as state_lib
from lm import workdir as workdir_lib
from lm.errors import UserError
from lm.model import forward

from conftest import random_batch

LORA = {"model.lora_rank": 4, "optim.lr": 1e-2}


@pytest.fixture(scope="module")
def base(experiment):  # noqa: F811
  """The resume experiment's 12-step run (checkpoints 4, 8, 12; evaluated at 12): the base of the LoRA runs."""
  root, _ = experiment
  train.train(config_lib.load_config(str(root / "exp.py")), str(root / "base"), progress=False)
  return root / "base"


@pytest.fixture(scope="module")
def adapted(experiment, base):  # noqa: F811
  """A 12-step LoRA run from `base` whose first batch is poisoned: step 1 keeps the starting params."""
  root, _ = experiment
  workdir = root / "lora"
  cfg = lora_config(experiment, base, **{"train.debug_nan_steps": "1", "train.eval_every": 1})
  train.train(cfg, str(workdir), progress=False)
  return workdir


def lora_config(experiment, base, **overrides):  # noqa: F811
  root, _ = experiment
  overrides = {**LORA, "train.init_from": str(base), **overrides}
  return config_lib.load_config(str(root / "exp.py"), [f"{k}={v}" for k, v in overrides.items()])


def eval_losses(workdir) -> dict[int, float]:
  return {r["step"]: r["eval/loss"] for r in metrics_lib.read_metrics(str(workdir)) if "eval/loss" in r}


def saved(workdir, step: int):
  """(state, meta) of checkpoint `step` of the run in `workdir` as it is stored (a LoRA run's: adapters only)."""
  cfg, tok = workdir_lib.load_run(str(workdir))
  setup = state_lib.build(cfg, tok.loaded_vocab_size, partitioning.make_mesh(cfg))
  ckpt = checkpoint_lib.Checkpointer(str(workdir))
  with setup.context():
    state, _, meta = ckpt.restore(step, setup.saved(setup.abstract_state))
  ckpt.close()
  return jax.device_get(state), meta


def names(tree) -> set[str]:
  return {
    jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  }


def tree_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


def nbytes(tree) -> int:
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_only_the_adapters_train_and_the_checkpoints_hold_only_them(base, adapted):
  # Step 1 was skipped, so its eval saw fresh adapters (B = 0): exactly the base model, on the same eval set.
  losses = eval_losses(adapted)
  assert losses[1] == eval_losses(base)[12]
  assert losses[12] < losses[1] - 0.1  # and the adapters learn
  _, _, _, base_params = workdir_lib.load_params(str(base))
  _, _, setup, params = workdir_lib.load_params(str(adapted))  # the base weights loaded back from `base`
  trained, frozen = lora.partition(params)
  assert tree_equal(frozen, base_params)  # bit for bit after 11 updates
  assert names(trained) == {n for n in names(params) if "_lora_" in n}
  assert all(np.any(b) for n, b in zip(sorted(names(trained)), jax.tree.leaves(trained), strict=True) if "lora_b" in n)

  # A checkpoint holds the adapters, Adam's moments of the adapters only, and where the base weights are.
  state, meta = saved(adapted, 12)
  earlier, _ = saved(adapted, 4)
  assert names(state.params) == names(trained)
  pairs = zip(jax.tree.leaves(state.params), jax.tree.leaves(earlier.params), strict=True)
  assert all(not np.array_equal(a, b) for a, b in pairs)  # A moves too, once B is not zero
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == 2 * sum(x.size for x in jax.tree.leaves(trained))
  record = json.loads((adapted / "init_from.json").read_text())
  assert meta["lora_base"]["run"] == record["run"] == str(base) and meta["lora_base"]["step"] == record["step"] == 12
  assert record["fresh_params"] == sorted(names(trained))
  # What the checkpoint stores, counted in array bytes (its files also hold orbax's metadata, whose size varies).
  base_state, _ = saved(base, 12)
  lora_bytes, base_bytes = nbytes(state), nbytes(base_state)
  print(f"checkpoint 12: LoRA run {lora_bytes:,} array bytes, its base run {base_bytes:,}")
  assert lora_bytes < base_bytes / 4


def test_a_killed_lora_run_resumes_to_the_uninterrupted_one(experiment, base, tmp_path):  # noqa: F811
  extra = [f"--config.{k}={v}" for k, v in {**LORA, "train.init_from": base}.items()]
  reference, workdir = tmp_path / "reference", tmp_path / "run"
  finish(lm_train(experiment, reference, *extra))
  at_6 = logged(workdir, 6)
  ready = lambda: at_6() and (workdir / "checkpoints" / "4").is_dir()  # its save is asynchronous
  code, _, err = signal_when(lm_train(experiment, workdir, *extra, slowed=(0.3, "")), ready, signal.SIGKILL)
  assert code == -signal.SIGKILL, err
  assert not (workdir / "checkpoints" / "12").exists()
  finish(lm_train(experiment, workdir, *extra))
  rows, expected = metrics_lib.read_metrics(str(workdir)), metrics_lib.read_metrics(str(reference))
  assert [r["step"] for r in rows] == list(range(1, 13))
  assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in expected]  # bitwise
  assert eval_losses(workdir) == eval_losses(reference)
  resumed, uninterrupted = saved(workdir, 12)[0], saved(reference, 12)[0]
  assert tree_equal(resumed, uninterrupted)  # adapters, moments, counters, RNG and clock


def test_merge_writes_a_plain_run_with_the_adapted_models_function(experiment, base, adapted, tmp_path, capsys):  # noqa: F811
  merged = tmp_path / "merged"
  assert cli.main(["lora", "merge", "--workdir", str(adapted), "--out", str(merged)]) == 0
  assert capsys.readouterr().out == f"merged the adapters of {adapted} at step 12 into {merged}\n"
  cfg, _ = workdir_lib.load_run(str(merged))
  assert cfg.model.lora_rank == 0 and cfg.train.init_from == ""
  assert [p.name for p in (merged / "checkpoints").iterdir()] == ["12"]
  assert json.loads((merged / "merged_from.json").read_text())["run"] == str(adapted)
  _, _, setup, params = workdir_lib.load_params(str(merged))
  _, _, lora_setup, lora_params = workdir_lib.load_params(str(adapted))
  assert not any("_lora_" in n for n in names(params))
  batch = random_batch(2, 32, 264)
  np.testing.assert_allclose(
    forward(setup.model, params, batch), forward(lora_setup.model, lora_params, batch), rtol=1e-4, atol=1e-4
  )

  # `lm sample` opens both, to the same greedy tokens and log-probs.
  def sample(workdir):
    argv = ["sample", "--workdir", str(workdir), "--prompt", "line 7: the", "--temperature", "0", "--json"]
    assert cli.main([*argv, "--max-new-tokens", "8"]) == 0
    return json.loads(capsys.readouterr().out)["samples"][0]["tokens"]

  from_merged, from_adapted = sample(merged), sample(adapted)
  assert [t["id"] for t in from_merged] == [t["id"] for t in from_adapted]
  np.testing.assert_allclose([t["logprob"] for t in from_merged], [t["logprob"] for t in from_adapted], atol=1e-4)

  # A run started from the merged one holds the adapted model at its (skipped) first step.
  overrides = {"train.init_from": str(merged), "train.steps": 1, "train.debug_nan_steps": "1"}
  root, _ = experiment
  cfg = config_lib.load_config(str(root / "exp.py"), [f"{k}={v}" for k, v in overrides.items()])
  final = train.train(cfg, str(tmp_path / "from_merged"), progress=False)
  assert final["eval/loss"] == pytest.approx(eval_losses(adapted)[12], abs=1e-4)


def test_bad_lora_requests_are_one_line_errors(experiment, base, adapted, tmp_path, capsys):  # noqa: F811
  def error(argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err

  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "file").write_text("x")
  assert "exists and is not an empty directory" in error(
    ["lora", "merge", "--workdir", str(adapted), "--out", str(occupied)]
  )
  assert "is not a LoRA run" in error(["lora", "merge", "--workdir", str(base), "--out", str(tmp_path / "m")])
  assert not (tmp_path / "m").exists()
  with pytest.raises(UserError, match="set train.init_from to that run"):
    train.train(lora_config(experiment, base, **{"train.init_from": ""}), str(tmp_path / "scratch"), progress=False)
  assert not (tmp_path / "scratch").exists()

  # Without its base run a LoRA run neither resumes nor opens, and says which run it needs.
  moved = tmp_path / "moved_base"
  shutil.move(base, moved)
  try:
    longer = lora_config(experiment, base, **{"train.steps": 14})
    with pytest.raises(UserError, match=f"the base run {base} of this LoRA run is gone"):
      train.train(longer, str(adapted), progress=False)
    assert f"the base run {base} of this LoRA run is gone" in error(
      ["sample", "--workdir", str(adapted), "--prompt", "a"]
    )
  finally:
    shutil.move(moved, base)
  assert max(eval_losses(adapted)) == 12  # the refused resume wrote nothing
