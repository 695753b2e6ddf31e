"""Runs that start from another run's params (`train.init_from = DIR`), and an objective of the test's own
(extra params, a frozen reference) trained by the one loop."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import metrics as metrics_lib
from lm import objectives, partitioning, train
from lm import state as state_lib
from lm import workdir as workdir_lib
from lm.errors import UserError
from lm.objectives.lm import NextToken
from lm.tokenizer import SPECIAL_TOKENS

from conftest import tiny_config


class Anchored(NextToken):
  """Next-token prediction pulled towards the starting params (a frozen reference, as DPO keeps one), plus a
  scalar of its own, `offset`, learned towards 1: an objective that adds params and holds a tree fixed."""

  def init_params(self, model, key):
    return {**super().init_params(model, key), "offset": nn.LogicallyPartitioned(jnp.zeros(()), ())}

  def frozen(self, params):
    return {"reference": model_params(params)}

  def make_loss(self, model):
    next_token = super().make_loss(model)

    def loss(params, batch, rng, frozen):
      total, n, sums = next_token(model_params(params), batch, rng, {})
      gaps = jax.tree.map(jnp.subtract, model_params(params), frozen["reference"])
      drift = sum(jnp.sum(jnp.square(gap)) for gap in jax.tree.leaves(gaps))  # (a norm's gradient is NaN at 0)
      return total + n * (drift + jnp.square(params["offset"] - 1.0)), n, {**sums, "drift": n * drift}

    return loss


class Scored(NextToken):
  """A score per position (a reward model's scalar head) regressed to 1 where `loss_mask` counts: a model
  whose params differ from those of the language model it starts from."""

  def model_config(self, model_cfg):
    return dataclasses.replace(model_cfg, head="scalar")

  def make_loss(self, model):
    def loss(params, batch, rng, frozen):
      scores_BxT = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
      return jnp.sum(jnp.square(scores_BxT - 1.0) * batch["loss_mask"]), jnp.sum(batch["loss_mask"]), {}

    return loss

  def evaluator(self, setup, tokenizer, batches, start):
    return lambda params: {"eval/score_norm": float(jnp.linalg.norm(params["score"]))}


def model_params(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != "offset"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A finished 4-step run (checkpoint 4) and the overrides that configure it."""
  root = tmp_path_factory.mktemp("init_from")
  (root / "corpus.txt").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400)))
  overrides = {"data.source": f"text:{root / 'corpus.txt'}", "data.cache_dir": str(root / "cache")}
  settings = {"train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4}
  train.train(tiny_config(**overrides, **settings), str(root / "source"), progress=False)
  return root / "source", overrides


def checkpoint(cfg, workdir, step: int):
  """(state, meta) of checkpoint `step` of the run in `workdir`, on host."""
  setup = state_lib.build(cfg, 264, partitioning.make_mesh(cfg))
  ckpt = checkpoint_lib.Checkpointer(str(workdir))
  with setup.context():
    state, _, meta = ckpt.restore(step, setup.abstract_state)
  ckpt.close()
  return jax.device_get(state), meta


def tree_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


def test_a_run_starts_from_the_newest_params_of_another_and_resumes_from_its_own(source, tmp_path):
  source_dir, overrides = source
  source_state, _ = checkpoint(tiny_config(**overrides), source_dir, 4)
  source_eval = [r["eval/loss"] for r in metrics_lib.read_metrics(str(source_dir)) if "eval/loss" in r][-1]
  workdir = tmp_path / "tuned"
  # Step 1's batch is poisoned, so its update is skipped: the checkpoint holds the params the run started from.
  cfg = tiny_config(**overrides, **{"train.init_from": str(source_dir), "train.steps": 1, "train.debug_nan_steps": "1"})
  final = train.train(cfg, str(workdir), progress=False)
  state, meta = checkpoint(cfg, workdir, 1)
  assert tree_equal(state.params, source_state.params)
  assert final["eval/loss"] == source_eval  # the same params on the same eval set
  assert int(state.step) == 0 and int(state.skipped_steps) == 1  # the step count starts afresh
  assert not tree_equal(state.opt_state, source_state.opt_state)  # so do Adam's moments
  assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state))
  record = json.loads((workdir / "init_from.json").read_text())
  assert record["run"] == str(source_dir) and record["step"] == 4 and record["fresh_params"] == []
  assert record["config"] == json.loads((source_dir / "config.json").read_text())
  assert meta["init_from"] == record
  assert json.loads((workdir / "config.json").read_text())["train"]["init_from"] == str(source_dir)

  # The run resumes from its own checkpoint, without its source (moved away here).
  shutil.move(source_dir, tmp_path / "moved")
  try:
    longer = tiny_config(**overrides, **{"train.init_from": str(source_dir), "train.steps": 3})
    assert train.train(longer, str(workdir), progress=False)["step"] == 3
  finally:
    shutil.move(tmp_path / "moved", source_dir)
  resumed, meta = checkpoint(longer, workdir, 3)
  assert int(resumed.step) == 2 and int(resumed.skipped_steps) == 1  # counted on from checkpoint 1
  assert meta["init_from"] == record
  assert [r["step"] for r in metrics_lib.read_metrics(str(workdir))] == [1, 2, 3]


def test_an_objective_adds_params_and_holds_a_frozen_tree(source, tmp_path, monkeypatch):
  monkeypatch.setitem(objectives.REGISTRY, "anchored", f"{__name__}:Anchored")
  source_dir, overrides = source
  source_state, _ = checkpoint(tiny_config(**overrides), source_dir, 4)
  cfg = tiny_config(**overrides, **{"train.objective": "anchored", "train.init_from": str(source_dir)})
  cfg.train.steps = 3
  workdir = tmp_path / "anchored"
  final = train.train(cfg, str(workdir), progress=False)
  state, _ = checkpoint(cfg, workdir, 3)
  assert tree_equal(state.frozen["reference"], source_state.params)  # made from the start, never updated
  assert not tree_equal(model_params(state.params), source_state.params)  # the params trained
  assert 0 < float(state.params["offset"]) < 1  # the objective's own param, fresh at 0, moved towards 1
  assert json.loads((workdir / "init_from.json").read_text())["fresh_params"] == ["offset"]
  assert final["train/drift"] > 0  # the objective's metric, logged as train/NAME
  # The loop evaluates any objective through its evaluator: here next-token prediction's.
  assert final["eval/loss"] > 0 and final["step"] == 3


def test_a_scalar_head_model_starts_from_a_language_models_trunk(source, tmp_path, monkeypatch):
  monkeypatch.setitem(objectives.REGISTRY, "scored", f"{__name__}:Scored")
  source_dir, overrides = source
  source_state, _ = checkpoint(tiny_config(**overrides), source_dir, 4)
  settings = {"train.steps": 3, "train.checkpoint_every": 1, "train.debug_nan_steps": "1"}  # checkpoint 1: the start
  cfg = tiny_config(**overrides, **settings, **{"train.objective": "scored", "train.init_from": str(source_dir)})
  workdir = tmp_path / "scored"
  final = train.train(cfg, str(workdir), progress=False)
  start, _ = checkpoint(cfg, workdir, 1)
  trunk = {k: v for k, v in source_state.params.items() if k != "head"}  # the LM head is dropped
  assert tree_equal({k: v for k, v in start.params.items() if k != "score"}, trunk)
  assert not np.any(start.params["score"]) and "head" not in start.params
  assert json.loads((workdir / "init_from.json").read_text())["fresh_params"] == ["score"]
  trained, _ = checkpoint(cfg, workdir, 3)
  norm = float(np.linalg.norm(trained.params["score"]))
  assert norm > 0 and final["eval/score_norm"] == pytest.approx(norm)  # it learns from there


def test_the_source_must_hold_a_checkpoint_of_the_same_model(source, tmp_path):
  source_dir, overrides = source
  wider = tiny_config(**overrides, **{"train.init_from": str(source_dir), "model.d_model": 64})
  with pytest.raises(UserError, match=r"do not fit .* shapes differ: embed \(264, 32\) \(want \(264, 64"):
    train.train(wider, str(tmp_path / "wider"), progress=False)
  empty = tmp_path / "empty_run"
  empty.mkdir()
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(source_dir / name, empty / name)
  with pytest.raises(UserError, match=f"train.init_from: {empty} has no checkpoint to load"):
    train.train(tiny_config(**overrides, **{"train.init_from": str(empty)}), str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "wider").exists() and not (tmp_path / "w").exists()
  assert workdir_lib.load_run(str(source_dir))[0].train.steps == 4  # the source is left as it was


def test_a_run_from_before_a_special_token_keeps_its_vocab_and_a_run_started_from_it_grows_it(source, tmp_path):
  _, overrides = source
  before = {"kind": "byte", "vocab_size": 263, "special": {name: i for i, name in enumerate(SPECIAL_TOKENS[:7])}}
  old = tmp_path / "old"
  old.mkdir()
  (old / "tokenizer.json").write_text(json.dumps(before))  # as lm saved it before <|tool|> existed
  settings = {"train.eval_every": 4, "train.checkpoint_every": 2}
  train.train(tiny_config(**overrides, **settings, **{"train.steps": 4}), str(old), progress=False)
  blob = checkpoint_lib.encode_blob(json.dumps(before).encode() + b"\n")
  for meta_file in old.glob("checkpoints/*/meta/metadata"):  # the tokenizer as its checkpoints held it then
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "tokenizer": blob}))
  # The run resumes and opens for sampling with its own vocabulary: 263 ids, no row for <|tool|>.
  assert train.train(tiny_config(**overrides, **settings, **{"train.steps": 6}), str(old), progress=False)["step"] == 6
  _, tok, _, params = workdir_lib.load_params(str(old))
  assert tok.special["<|tool|>"] == 263 and params["embed"].shape == (263, 32)
  # A run started from it has a row for <|tool|>: the mean of the others.
  tuned = tiny_config(**overrides, **{"train.init_from": str(old), "train.steps": 1, "train.debug_nan_steps": "1"})
  train.train(tuned, str(tmp_path / "tuned"), progress=False)
  state, _ = checkpoint(tuned, tmp_path / "tuned", 1)
  embed_VxD = np.asarray(jax.device_get(params["embed"]))
  np.testing.assert_array_equal(state.params["embed"][:263], embed_VxD)
  np.testing.assert_allclose(state.params["embed"][263], embed_VxD.mean(axis=0), rtol=1e-5, atol=1e-7)
  assert json.loads((tmp_path / "tuned" / "tokenizer.json").read_text())["added"] == ["<|tool|>"]
