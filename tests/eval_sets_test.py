"""End to end: the eval sets a run logs, and train and eval losses that measure the same thing."""

import json

import flax
import jax
import numpy as np
from train_test import markov_text

from lm import metrics as metrics_lib
from lm import plots, train
from lm.data import pipeline
from lm.objectives import lm as next_token

from conftest import tiny_config


def test_train_and_eval_losses_agree_and_eval_sources_are_logged(tmp_path):
  text, entropy = markov_text(400_000)
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(500):  # many similar documents: pieces of one Markov chain
    (docs / f"{i:03d}.txt").write_text(text[i * 800 : (i + 1) * 800])
  other, _ = markov_text(20_000, seed=1)  # another chain: a different domain
  (tmp_path / "other.txt").write_text(other)
  cfg = tiny_config(
    **{
      "data.source": f"text:{docs}/*.txt",
      "data.eval_fraction": 0.1,
      "data.eval_sources": (f"other=all:text:{tmp_path / 'other.txt'}",),
      "data.seq_len": 64,
      "model.d_model": 64,
      "model.d_ff": 128,
      "train.batch_size": 16,
      "train.steps": 150,
      "train.eval_every": 75,
      "train.eval_batches": 8,
      "train.log_every": 1,
      "train.checkpoint_every": 150,
      "optim.warmup_steps": 10,
    }
  )
  final = train.train(cfg, str(tmp_path / "run"), progress=False)
  rows = metrics_lib.read_metrics(str(tmp_path / "run"))
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [75, 150]
  for r in evals:
    assert {"eval/other/loss", "eval/other/bpb", "eval/other/tokens", "eval/tokens", "eval/documents"} <= set(r)
  # 8 batches of 16 x 64 targets, less one (a BOS) per document boundary inside a row.
  assert 8 * 16 * 64 - evals[0]["eval/documents"] <= evals[0]["eval/tokens"] < 8 * 16 * 64
  assert 20 <= evals[0]["eval/documents"] <= 60  # rows from many of the ~50 held-out documents
  # The last steps' train loss (their lr is near its floor) measures what the eval loss measures.
  train_loss = np.mean([r["train/loss"] for r in rows if r["step"] > 140])
  assert abs(train_loss - final["eval/loss"]) < 0.05, (train_loss, final["eval/loss"])
  assert final["eval/loss"] < 1.15 * entropy
  # The other domain's chain is not the one learned.
  assert final["eval/other/loss"] > final["eval/loss"] + 0.2
  assert plots.eval_source_names(rows) == ["other"]
  # The model FLOPs (6N+attn, dense attention) exceed what the blocked causal step computes.
  logged = [r for r in rows if "mfu" in r]
  assert logged and all(0 < r["mfu_computed"] < r["mfu"] for r in logged)
  versions = json.loads((tmp_path / "run" / "environment.json").read_text())
  assert versions["jax"] == jax.__version__ and versions["flax"] == flax.__version__


def test_each_eval_set_is_described_once_and_a_small_one_gets_a_warning(capsys):
  cfg = tiny_config(**{"data.source": "text:/corpus/*.txt", "data.eval_sources": ("code=all:text:/code.txt",)})
  cfg.data.eval_min_tokens = 1_000
  sets = {"": pipeline.EvalSet([{}] * 4, 4_000, 12), "code": pipeline.EvalSet([{}], 999, 1)}
  sizes = next_token.describe_eval_sets(cfg, sets)
  assert sizes == {"eval/tokens": 4_000, "eval/documents": 12, "eval/code/tokens": 999, "eval/code/documents": 1}
  err = capsys.readouterr().err.splitlines()
  assert err[0] == "lm: eval set eval (text:/corpus/*.txt): 4,000 tokens of 12 documents in 4 batches"
  assert err[1] == "lm: eval set eval/code (text:/code.txt): 999 tokens of 1 documents in 1 batches"
  assert err[2].startswith("lm: warning: eval set eval/code holds 999 tokens, fewer than data.eval_min_tokens=1,000")
  assert len(err) == 3
