"""The reward model (`train.objective = "reward"`) through the real loop, and `lm reward`."""

import json
import math
import shutil

import numpy as np
import pytest

from lm import cli, step, train
from lm import config as config_lib
from lm import metrics as metrics_lib

from conftest import tiny_config, write_pairs


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
  """A reward model trained for 30 steps on pairs whose chosen reply is vowels and rejected one consonants."""
  root = tmp_path_factory.mktemp("reward")
  settings = {"train.objective": "reward", "train.steps": 30, "train.eval_every": 15, "data.eval_fraction": 0.2}
  cfg = tiny_config(**settings, **{"data.post_source": write_pairs(root / "pairs.jsonl", 200)})
  cfg.data.cache_dir = str(root / "cache")
  final = train.train(cfg, str(root / "run"), progress=False)
  return root, final


def test_the_loss_starts_at_ln2_and_held_out_pairs_are_ranked(reward_run):
  root, final = reward_run
  rows = metrics_lib.read_metrics(str(root / "run"))
  # The score head starts at zero: every reward is 0, every pair a tie.
  assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert rows[0]["train/rewards/accuracy"] == 0.5 and rows[0]["train/rewards/margin"] == 0.0
  assert final["eval/rewards/accuracy"] > 0.9 and final["eval/rewards/margin"] > 0
  assert final["eval/loss"] < 0.3 < math.log(2)
  assert final["eval/pairs"] == 8  # train.eval_batches = 2 batches of 4 pairs
  assert [r["step"] for r in rows if "data/examples" in r] == [15]


def test_lm_reward_prints_a_json_line_per_record(reward_run, tmp_path, capsys):
  root, _ = reward_run
  write_pairs(tmp_path / "new.jsonl", 4, seed=7)
  pairs = [json.loads(line) for line in (tmp_path / "new.jsonl").read_text().splitlines()]
  conversation = [{"role": "user", "content": pairs[0]["prompt"]}, {"role": "assistant", "content": pairs[0]["chosen"]}]
  lines = [json.dumps(p) for p in pairs] + [json.dumps({"messages": conversation})]
  (tmp_path / "score.jsonl").write_text("\n".join(lines) + "\n")
  capsys.readouterr()
  assert cli.main(["reward", "--workdir", str(root / "run"), "--file", str(tmp_path / "score.jsonl")]) == 0
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [set(p) for p in printed] == [{"chosen", "rejected", "truncated"}] * 4 + [{"reward", "truncated"}]
  assert all(p["chosen"] > p["rejected"] and not p["truncated"] for p in printed[:4])  # new pairs, ranked by the rule
  assert printed[4]["reward"] == pytest.approx(printed[0]["chosen"], abs=1e-5)  # the same ids as pair 0's chosen row


def test_lm_reward_refuses_a_run_that_is_not_a_reward_model(reward_run, tmp_path, capfd):
  root, _ = reward_run
  (tmp_path / "run").mkdir()
  shutil.copy(root / "run" / "tokenizer.json", tmp_path / "run" / "tokenizer.json")
  (tmp_path / "run" / "config.json").write_text(config_lib.to_json(tiny_config(**{"train.objective": "dpo"})))
  assert cli.main(["reward", "--workdir", str(tmp_path / "run"), "--file", str(root / "pairs.jsonl")]) == 2
  err = capfd.readouterr().err
  assert err.strip() == f"lm: error: {tmp_path / 'run'} is a train.objective=dpo run, not a reward model (reward)"


def test_microbatches_keep_the_rows_of_a_pair_together():
  rows_B = np.arange(16)
  micro = np.asarray(step.microbatches(rows_B, 4, 2))
  assert micro.shape == (4, 4)
  assert all((m[0::2] % 2 == 0).all() and (m[1::2] == m[0::2] + 1).all() for m in micro)  # (2p, 2p + 1) pairs
  assert sorted(micro.ravel().tolist()) == list(range(16))
  assert np.asarray(step.microbatches(rows_B, 4)).tolist() == rows_B.reshape(4, 4).T.tolist()  # interleaved rows
