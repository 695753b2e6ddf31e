"""PPO and GRPO (`lm.objectives.rl`) through the real loop on tiny runs of the instruction world: where each
rollout starts, what the sampler compiles, what the rollout holds, the sharded step, and one-line errors."""

import json

import numpy as np
import pytest

from lm import metrics as metrics_lib
from lm import train
from lm import workdir as workdir_lib
from lm.errors import UserError
from lm.worlds import instructions

from conftest import run_devices_script, tiny_config

STEPS = 8  # two rollouts of 2 minibatches x 2 epochs


def rl_config(root, paths, objective, **extra):
  settings = {
    "data.cache_dir": str(root / "cache"),
    "data.seq_len": 96,
    "train.objective": objective,
    "data.post_source": f"jsonl:{paths['prompts_train']}",
    "data.post_eval_source": f"jsonl:{paths['eval']}",
    "train.init_from": str(root / "sft"),
    "train.steps": STEPS,
    "train.eval_every": STEPS,
    "rl.num_minibatches": 2,
    "rl.ppo_epochs": 2,
    "rl.max_new_tokens": 16,
    "rl.eval_prompts": 12,
    "optim.lr": 1e-3,
  }
  if objective == "ppo":
    settings["rl.reward_model"] = str(root / "rm")
  else:
    settings |= {"rl.reward_fn": "lm.worlds.instructions:correct", "rl.group_size": 4}
  return tiny_config(**{**settings, **extra})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A small world, an SFT run, a reward model from it, and a PPO and a GRPO run from the SFT run."""
  root = tmp_path_factory.mktemp("rl")
  paths = instructions.write_world(
    root / "world", seed=0, n_train=200, n_eval=40, n_pairs=100, n_pretrain=20, n_prompts=200
  )
  common = {"data.cache_dir": str(root / "cache"), "data.seq_len": 96, "data.eval_fraction": 0.1, "train.steps": 4}
  sft = tiny_config(**common, **{"data.post_source": f"jsonl:{paths['sft_train']}"})
  train.train(sft, str(root / "sft"), progress=False)
  rm = {"train.objective": "reward", "data.post_source": f"jsonl:{paths['prefs_train']}"}
  train.train(tiny_config(**common, **rm, **{"train.init_from": str(root / "sft")}), str(root / "rm"), progress=False)
  finals = {}
  for objective in ("ppo", "grpo"):
    finals[objective] = train.train(rl_config(root, paths, objective), str(root / objective), progress=False)
  return root, paths, finals


def rows_of(workdir) -> dict[int, dict]:
  return {r["step"]: r for r in metrics_lib.read_metrics(str(workdir))}


@pytest.mark.parametrize("objective", ["ppo", "grpo"])
def test_each_rollout_starts_at_ratio_one_and_the_policy_starts_at_its_reference(world, objective):
  root, _, finals = world
  rows = rows_of(root / objective)
  assert sorted(rows) == list(range(1, STEPS + 1))
  for first in (1, 5):  # the first minibatch after each rollout: the params that sampled it
    assert rows[first]["train/clipfrac"] == 0.0
    assert rows[first]["train/approx_kl"] == pytest.approx(0.0, abs=1e-10)
  assert rows[1]["rl/kl"] == 0.0 and rows[1]["rl/rollouts"] == 1 and rows[5]["rl/rollouts"] == 2
  for first in (1, 5):  # the sampler's cached decoding and the training forward give the tokens one log-prob
    assert rows[first]["rl/sampler_logp_gap_max"] < 1e-4
  assert rows[5]["rl/kl"] > 0  # four updates later the policy has moved from its reference
  assert max(r["train/approx_kl"] for r in rows.values()) > 0
  if objective == "grpo":
    assert rows[1]["train/kl"] == pytest.approx(0.0, abs=1e-10)
    assert all(0 <= r["rl/frac_reward_zero_std"] <= 1 for r in rows.values())
  else:
    assert "rl/frac_reward_zero_std" not in rows[1]  # PPO's groups are single replies
  final = finals[objective]
  for key in ("eval/reward", "eval/response_length", "eval/ended", "rl/rollout_tokens_per_s", "rl/rollout_share"):
    assert np.isfinite(final[key]), key
  assert 0 < final["rl/rollout_share"] < 1 and final["rl/update_tokens_per_s"] > 0
  assert "->" in final["samples/0"]


@pytest.mark.parametrize("objective", ["ppo", "grpo"])
def test_the_sampler_compiles_once_for_every_rollout_and_eval(world, objective):
  root, _, _ = world
  rows = rows_of(root / objective)
  assert rows[1]["rl/sampler_compiles"] == rows[STEPS]["rl/sampler_compiles"] == 2  # prefill and decode loop


def test_ppo_records_values_and_a_reward_model_score(world):
  root, _, finals = world
  rows = rows_of(root / "ppo")
  for key in ("train/value_loss", "train/value_clipfrac", "rl/explained_variance", "rl/score", "rl/reward_with_kl"):
    assert all(np.isfinite(r[key]) for r in rows.values()), key
  assert rows[1]["rl/score"] != 0  # the reward model scores responses
  # The reward is the score less the penalty for responses that never ended their turn.
  for r in rows.values():
    assert r["rl/reward"] == pytest.approx(r["rl/score"] - (1 - r["rl/ended"]), abs=1e-6)
  record = json.loads((root / "ppo" / "init_from.json").read_text())
  assert record["fresh_params"] == ["value_head"]  # the value head is new; the rest is the SFT run's


def test_the_rollout_is_in_the_checkpoint_between_rollouts(world, tmp_path):
  root, paths, _ = world
  cfg = rl_config(root, paths, "grpo", **{"train.steps": 4, "train.checkpoint_every": 1, "train.keep_checkpoints": 5})
  train.train(cfg, str(tmp_path / "run"), progress=False)
  run_cfg, tok, setup, _ = workdir_lib.load_checkpoint(str(tmp_path / "run"))
  states = {
    step: workdir_lib.restore_newest(str(tmp_path / "run"), run_cfg, tok, setup, step).data_state for step in (1, 4)
  }
  assert states[1]["rollouts"] == 1 and "buffer" in states[1]  # mid-rollout: its rows and advantages saved
  assert states[4]["rollouts"] == 1 and "buffer" not in states[4]  # used up: the next step makes a new one
  buffer = {k: np.array(v["values"], v["dtype"]) for k, v in states[1]["buffer"].items()}
  assert buffer["advantages"].shape == buffer["inputs"].shape == (16, 96)
  assert np.all(buffer["advantages"][buffer["loss_mask"] == 0] == 0)
  groups = buffer["inputs"].reshape(4, 4, 96)  # a group's four responses share their prompt
  assert all((g[0, :20] == g[1:, :20]).all() for g in groups)


def test_at_another_temperature_the_loss_and_the_rollout_score_the_tempered_policy(world, tmp_path):
  """At rl.temperature 0.5 the rollout's log-probs and the loss's are both of softmax(logits / 0.5): the first
  minibatch of each rollout is still at ratio 1; the sampler's untempered log-probs still match the model's."""
  root, paths, _ = world
  cfg = rl_config(root, paths, "grpo", **{"rl.temperature": 0.5})
  train.train(cfg, str(tmp_path / "run"), progress=False)
  rows = rows_of(tmp_path / "run")
  for first in (1, 5):
    assert rows[first]["train/approx_kl"] == pytest.approx(0.0, abs=1e-10) and rows[first]["train/clipfrac"] == 0
    assert rows[first]["rl/sampler_logp_gap_max"] < 1e-4
  assert max(r["train/approx_kl"] for r in rows.values()) > 0
  # A sharper distribution: the entropy of the first rollout's tokens is below the temperature-1 run's.
  assert rows[1]["rl/entropy"] < rows_of(root / "grpo")[1]["rl/entropy"]


BAD = [
  ({"rl.reward_model": "", "rl.reward_fn": ""}, "needs exactly one of rl.reward_model"),
  ({"rl.reward_fn": "lm.worlds.instructions:no_such"}, "rl.reward_fn 'lm.worlds.instructions:no_such' cannot be"),
  ({"rl.group_size": 1}, "rl.group_size must be"),
  ({"train.init_from": ""}, "needs train.init_from"),
  ({"rl.max_new_tokens": 96}, "rl.max_new_tokens must be in"),
  ({"rl.kl_estimator": "k2"}, "rl.kl_estimator must be"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_rl_settings_are_one_line_errors_before_the_workdir_is_written(world, tmp_path, extra, message):
  root, paths, _ = world
  with pytest.raises(UserError, match=message.replace("(", r"\(")):
    train.train(rl_config(root, paths, "grpo", **extra), str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_a_reward_model_must_be_a_reward_run(world, tmp_path):
  root, paths, _ = world
  with pytest.raises(UserError, match="is not a reward model"):
    train.train(rl_config(root, paths, "ppo", **{"rl.reward_model": str(root / "sft")}), str(tmp_path / "r"))
  assert not (tmp_path / "r").exists()


MESH_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
import rl_objective_test as t
from lm import metrics, train
root, paths = __import__("pathlib").Path(ROOT), json.loads(PATHS)
out = {}
for objective in ("ppo", "grpo"):
  cfg = t.rl_config(root, paths, objective)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  train.train(cfg, str(root / f"mesh_{objective}"), progress=False)
  out[objective] = metrics.read_metrics(str(root / f"mesh_{objective}"))
print(json.dumps(out))
"""


def test_a_step_on_a_data_fsdp_tensor_mesh_equals_one_device(world):
  root, paths, _ = world
  code = MESH_SCRIPT.replace("ROOT", repr(str(root))).replace(
    "PATHS", repr(json.dumps({k: str(v) for k, v in paths.items()}))
  )
  out = run_devices_script(code, devices=8, timeout=600)
  for objective in ("ppo", "grpo"):
    one, mixed = rows_of(root / objective), {r["step"]: r for r in out[objective]}
    assert sorted(mixed) == sorted(one)
    for step, a in one.items():
      for key in ("train/loss", "train/policy_loss", "grad_norm", "rl/score", "rl/kl", "eval/reward"):
        if key in a:
          assert mixed[step][key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (objective, step, key)


def test_greedy_in_group_puts_the_policys_greedy_reply_first_in_each_group(world, tmp_path):
  """rl.greedy_in_group: a group's first response is what greedy decoding of the rollout's params gives (here
  the SFT start's, the first rollout coming before any update); the others are sampled."""
  from lm import chat, sample_cli  # noqa: PLC0415
  from lm.sampling import SamplingParams  # noqa: PLC0415

  root, paths, _ = world
  extra = {"train.steps": 1, "train.checkpoint_every": 1, "rl.greedy_in_group": True}
  train.train(rl_config(root, paths, "grpo", **extra), str(tmp_path / "run"), progress=False)
  run_cfg, tok, setup, _ = workdir_lib.load_checkpoint(str(tmp_path / "run"))
  state = workdir_lib.restore_newest(str(tmp_path / "run"), run_cfg, tok, setup, 1).data_state
  buffer = {k: np.array(v["values"], v["dtype"]) for k, v in state["buffer"].items()}
  prompts, responses = [], []
  for inputs, targets, mask in zip(buffer["inputs"], buffer["targets"], buffer["loss_mask"], strict=True):
    first = int(np.argmax(mask))  # the target position of the response's first token
    prompts.append([int(t) for t in inputs[: first + 1]])
    responses.append([int(t) for t in targets[mask > 0]])
  sampler, params, sft_setup = sample_cli.load_sampler(str(root / "sft"))
  requests = [SamplingParams(16, 0.0, stop_tokens=chat.stop_tokens(tok), seed=0) for _ in prompts[::4]]
  with sft_setup.context():
    greedy = sampler.generate_all(params, prompts[::4], requests, 4)
  for g, response in zip(greedy, responses[::4], strict=True):
    assert response[: len(g.tokens)] == list(g.tokens)  # the response also holds the <|end|> the sampler stops at
  assert any(responses[i] != responses[i - i % 4] for i in range(16) if i % 4)  # the rest are sampled
