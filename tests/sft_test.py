"""Supervised fine-tuning: objective `lm` on `data.post_source` conversations, through the real loop."""

import json
import math

from lm import metrics as metrics_lib
from lm import train

from conftest import tiny_config, write_conversations


def test_sft_learns_the_assistant_reply_and_counts_only_its_tokens(tmp_path):
  source = write_conversations(tmp_path / "train.jsonl", 200)
  with open(tmp_path / "train.jsonl", "a") as f:  # one kept cut to seq_len + 1 ids, one left with no reply
    for user, reply in (("hi", "yes " + "z" * 40), ("z" * 40, "yes")):
      f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}))
      f.write("\n")
  eval_source = write_conversations(tmp_path / "eval.jsonl", 20, seed=1)
  settings = {"train.steps": 30, "train.eval_every": 15, "train.eval_batches": 8}
  cfg = tiny_config(**settings, **{"data.post_source": source, "data.post_eval_source": eval_source})
  cfg.data.cache_dir = str(tmp_path / "cache")
  final = train.train(cfg, str(tmp_path / "run"), progress=False)

  # The user says 8 random letters, the assistant "yes": with the user's text counted the loss could not fall
  # below 8 ln(26) / 15 = 1.7 nats per target; on the reply's targets alone it nears 0.
  assert final["eval/documents"] == 20 and final["eval/tokens"] == 20 * len(["y", "e", "s", "<|end|>"])
  assert final["eval/loss"] < 1.0 < 8 * math.log(26) / 15
  assert final["eval/next_train_batches_loss"] < 1.0
  rows = metrics_lib.read_metrics(str(tmp_path / "run"))
  counted = [r for r in rows if "data/examples" in r]
  assert [r["step"] for r in counted] == [15]  # logged once, with the first evaluation
  assert counted[0]["data/examples"] == 201 and counted[0]["data/eval_examples"] == 20
  assert counted[0]["data/truncated"] == 1 and counted[0]["data/dropped"] == 1
  assert "eval/unigram_loss" not in final
