"""DPO (`train.objective = "dpo"`) through the real loop: the reference computed in the step or precomputed."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from lm import metrics as metrics_lib
from lm import partitioning, plan, train
from lm import state as state_lib
from lm import step as step_lib
from lm import workdir as workdir_lib

from conftest import tiny_config, write_conversations, write_pairs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An SFT run (the policy's start), then DPO from it with the reference in the step, precomputed with two
  microbatches a step, and in the step for LoRA adapters: {name: (workdir, final metrics)}."""
  root = tmp_path_factory.mktemp("dpo")
  common = {"data.cache_dir": str(root / "cache"), "data.eval_fraction": 0.2}
  sft = tiny_config(**common, **{"data.post_source": write_conversations(root / "chats.jsonl", 100), "train.steps": 5})
  train.train(sft, str(root / "sft"), progress=False)
  pairs = write_pairs(root / "pairs.jsonl", 200)
  out = {}
  for name, settings in {
    "step": {},
    "precomputed": {"dpo.reference": "precomputed", "optim.grad_accum_steps": 2},
    "lora": {"model.lora_rank": 4},
    "rpo": {"dpo.rpo_alpha": 0.5},
  }.items():
    cfg = tiny_config(**common, **settings, **{"train.objective": "dpo", "train.init_from": str(root / "sft")})
    cfg.data.post_source, cfg.train.steps, cfg.train.eval_every = pairs, 12, 12
    out[name] = (root / name, train.train(cfg, str(root / name), progress=False))
  return root, out


def test_the_policy_starts_as_its_reference_and_learns_the_preference(runs):
  _, out = runs
  for name, (workdir, final) in out.items():
    first = metrics_lib.read_metrics(str(workdir))[0]
    nll = 0.5 * first.get("train/nll_loss", 0.0)  # the rpo run's NLL term (test_rpo_...)
    assert first["train/loss"] == pytest.approx(math.log(2) + nll, abs=1e-6), name
    assert first["train/rewards/accuracy"] == 0.5 and first["train/rewards/margin"] == 0.0, name  # every reward 0
    assert first["train/logps/chosen"] < 0 and first["train/logps/rejected"] < 0
    assert final["eval/rewards/margin"] > 0 and final["eval/loss"] < math.log(2) + nll, name
    assert final["eval/pairs"] == 8
  assert out["step"][1]["eval/rewards/accuracy"] > 0.8


def test_a_precomputed_reference_gives_the_losses_of_the_step_reference(runs):
  _, out = runs
  rows = {name: metrics_lib.read_metrics(str(workdir)) for name, (workdir, _) in out.items()}
  assert len(rows["step"]) == len(rows["precomputed"]) == 12
  for step_row, precomputed_row in zip(rows["step"], rows["precomputed"], strict=True):
    for key in ("train/loss", "grad_norm", "train/rewards/margin", "train/logps/chosen"):
      assert precomputed_row[key] == pytest.approx(step_row[key], rel=1e-4, abs=1e-6), (step_row["step"], key)
  # Model FLOPs count the reference's forward pass where the step runs it: a third of a forward and backward.
  first = {name: r[0]["flops"] / r[0]["tokens"] for name, r in rows.items()}
  assert first["step"] == pytest.approx(first["precomputed"] * 4 / 3)


def test_the_reference_lives_in_the_state_or_in_the_data_state(runs):
  root, out = runs
  sft_params = restored(root / "sft").state.params
  step_run, precomputed_run = restored(out["step"][0]), restored(out["precomputed"][0])
  assert set(step_run.state.frozen) == {"reference"} and precomputed_run.state.frozen == {}
  assert restored(out["lora"][0]).state.frozen == {}  # its reference is its base: the adapters off
  reference, start = jax.tree.leaves(step_run.state.frozen["reference"]), jax.tree.leaves(sft_params)
  assert all(np.array_equal(a, b) for a, b in zip(reference, start, strict=True))  # never updated
  assert "ref_logps" not in step_run.data_state
  tables = precomputed_run.data_state["ref_logps"]
  assert len(tables["train"]) == 2 * out["precomputed"][1]["data/examples"]
  assert len(tables["eval"]) == 2 * out["precomputed"][1]["data/eval_examples"]
  assert max(tables["train"]) < 0


def restored(workdir):
  """The newest checkpoint of the run in `workdir`, on host."""
  found = workdir_lib.load_checkpoint(str(workdir))[3]
  return dataclasses.replace(found, state=jax.device_get(found.state))


@pytest.mark.parametrize("reference, keys", [("step", {"margin"}), ("precomputed", {"margin", "ref_logps"})])
def test_lm_plan_compiles_the_step_on_the_batch_the_objective_reads(reference, keys):
  cfg = tiny_config(**{"train.objective": "dpo", "dpo.reference": reference})
  setup = state_lib.build(cfg, 264, partitioning.make_mesh(cfg))
  batch = plan.abstract_batch(cfg, setup.mesh)
  assert {k for k, x in batch.items() if x.shape == (8,)} == keys
  with setup.context():
    step_lib.make_train_step(setup).lower(setup.abstract_state, batch)  # the loss finds every key it reads


def test_rpo_adds_the_chosen_replies_nll_per_token(runs):
  _, out = runs
  first = {name: metrics_lib.read_metrics(str(workdir))[0] for name, (workdir, _) in out.items()}
  rpo, plain = first["rpo"], first["step"]
  assert "train/nll_loss" not in plain and rpo["train/nll_loss"] > 0
  assert rpo["train/loss"] == pytest.approx(math.log(2) + 0.5 * rpo["train/nll_loss"], abs=1e-6)
  # The same params and batch as the plain run's first step: its chosen log-prob over the chosen tokens.
  assert rpo["train/logps/chosen"] == plain["train/logps/chosen"]
