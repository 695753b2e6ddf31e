import json
import math

import jax
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import metrics as metrics_lib
from lm import optim, partitioning, train
from lm import state as state_lib
from lm import step as step_lib
from lm import tokenizer as tokenizer_lib
from lm.errors import UserError

from conftest import random_batch, tiny_config


def markov_text(length: int, alphabet: str = "abcdefgh", seed: int = 0) -> tuple[str, float]:
  """A sample of a random first-order Markov chain, and the chain's entropy rate in nats/symbol."""
  rng = np.random.default_rng(seed)
  k = len(alphabet)
  transitions = rng.dirichlet(np.full(k, 0.5), size=k)
  stationary = np.full(k, 1 / k)
  for _ in range(1000):
    stationary = stationary @ transitions
  entropy = -np.sum(stationary[:, None] * transitions * np.log(transitions))
  states = np.empty(length, np.int64)
  states[0] = 0
  cumulative = np.cumsum(transitions, axis=1)
  u = rng.random(length)
  for i in range(1, length):
    states[i] = min(np.searchsorted(cumulative[states[i - 1]], u[i]), k - 1)
  return "".join(alphabet[s] for s in states), float(entropy)


def test_learns_a_markov_chain_to_its_entropy_rate(tmp_path):
  text, entropy = markov_text(300_000)
  (tmp_path / "chain.txt").write_text(text)
  cfg = tiny_config(
    **{
      "data.source": f"text:{tmp_path / 'chain.txt'}",
      "data.seq_len": 64,
      "data.eval_fraction": 0.05,
      "model.d_model": 64,
      "model.d_ff": 128,
      "train.batch_size": 16,
      "train.steps": 300,
      "train.eval_every": 300,
      "train.eval_batches": 8,
      "train.log_every": 50,
      "train.checkpoint_every": 300,
      "optim.warmup_steps": 20,
    }
  )
  final = train.train(cfg, str(tmp_path / "run"), progress=False)
  assert final["eval/loss"] < 1.05 * entropy, (final["eval/loss"], entropy)
  assert final["eval/loss"] > 0.97 * entropy  # cannot beat the entropy rate
  # Byte tokens: bits per byte is nats per token / ln 2.
  assert final["eval/bpb"] == pytest.approx(final["eval/loss"] / math.log(2), rel=1e-4)
  assert final["eval/unigram_loss"] > final["eval/loss"] + 0.1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  (root / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox {i % 13}\n" for i in range(3000)))
  cfg = tiny_config(
    **{
      "data.source": f"text:{root / 'corpus.txt'}",
      "data.cache_dir": str(root / "cache"),
      "optim.schedule": "constant",
    }
  )
  workdir = root / "workdir"
  final = train.train(cfg, str(workdir), progress=False)
  return cfg, workdir, final


def test_run_leaves_metrics_plots_events_and_checkpoints(finished_run):
  cfg, workdir, final = finished_run
  rows = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in rows] == list(range(1, 11))
  for row in rows:
    assert row["tokens"] == row["step"] * 8 * 32
    assert row["flops"] > 0 and math.isfinite(row["train/loss"])
    assert {"lr", "grad_norm", "param_norm"} <= set(row)
  assert "compile_s" in rows[0]
  assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows[1:])  # step 1 compiles
  assert {r["step"] for r in rows if "eval/loss" in r} == {5, 10}
  assert "eval/bpb" in rows[-1] and "eval/perplexity" in rows[-1]
  assert (workdir / "plots" / "loss_vs_tokens.png").stat().st_size > 1000
  assert (workdir / "plots" / "loss_vs_flops.png").stat().st_size > 1000
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 32
  assert tokenizer_lib.load_tokenizer(workdir).vocab_size == 264
  ckpt = checkpoint_lib.Checkpointer(str(workdir))
  assert ckpt.latest_step() == 10
  meta = ckpt.restore_meta(10)
  assert meta["config"]["model"]["d_model"] == 32
  assert tokenizer_lib.Tokenizer.from_bytes(checkpoint_lib.decode_blob(meta["tokenizer"])).kind == "byte"
  ckpt.close()
  assert final["step"] == 10


def test_resume_continues_with_identical_losses(finished_run, tmp_path):
  cfg, workdir, _ = finished_run
  short = tiny_config(**{k: v for k, v in _flat(cfg).items() if k != "train.steps"}, **{"train.steps": 6})
  train.train(short, str(tmp_path / "resumed"), progress=False)  # checkpoints at 5 and 6
  train.train(cfg, str(tmp_path / "resumed"), progress=False)  # the same run, continued to 10
  uninterrupted = {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(str(workdir))}
  resumed = metrics_lib.read_metrics(str(tmp_path / "resumed"))
  assert [r["step"] for r in resumed] == list(range(1, 11))
  assert {r["step"]: r["train/loss"] for r in resumed} == uninterrupted


def test_resume_refuses_a_changed_model(finished_run):
  cfg, workdir, _ = finished_run
  wider = tiny_config(**{**_flat(cfg), "model.d_model": 64})
  with pytest.raises(UserError, match="model.d_model: 32 -> 64"):
    train.train(wider, str(workdir), progress=False)


def test_token_budget_ends_the_run_early(tmp_path, text_corpus):
  cfg = tiny_config(**{"data.source": text_corpus, "train.steps": 100, "train.max_tokens": 4 * 8 * 32})
  assert train.train(cfg, str(tmp_path / "w"), progress=False)["step"] == 4


def _flat(cfg):
  from lm.config import flatten

  return flatten(cfg.to_dict())


def test_stop_at_step_stops_the_run_but_keeps_its_schedule(tmp_path, text_corpus):
  cfg = tiny_config(**{"data.source": text_corpus, "train.steps": 10, "train.stop_at_step": 3})
  assert train.train(cfg, str(tmp_path / "w"), progress=False)["step"] == 3
  schedule = optim.make_schedule(cfg)  # of the 10 steps
  logged = [r["lr"] for r in metrics_lib.read_metrics(str(tmp_path / "w"))]
  assert logged == pytest.approx([float(schedule(s)) for s in range(3)], rel=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_resuming_with_more_steps_continues_the_lr_without_a_jump(tmp_path, text_corpus, schedule):
  overrides = {"data.source": text_corpus, "optim.schedule": schedule, "optim.cooldown_fraction": 0.5}
  workdir = str(tmp_path / "w")
  at = 6  # stopped mid-decay (a preemption), resumed with more steps
  train.train(tiny_config(**overrides, **{"train.steps": 8, "train.stop_at_step": at}), workdir, progress=False)
  final = train.train(tiny_config(**overrides, **{"train.steps": 14}), workdir, progress=False)
  assert final["step"] == 14
  lrs = np.array([r["lr"] for r in metrics_lib.read_metrics(workdir)])  # row n: the lr of update n - 1
  changes = np.abs(np.diff(lrs))  # changes[at - 1]: from the last update before the resume to the first after
  assert changes[at - 1] <= np.max(np.delete(changes, at - 1)) + 1e-9
  assert np.all(np.diff(lrs[2:]) <= 1e-9) and lrs[-1] < lrs[at]
  last = tiny_config(**overrides, **{"train.steps": 14})
  # The restored state's clock ends the stretched schedule at the final lr at step 14.
  state = checkpoint_state(last, workdir, 14)
  assert float(optim.learning_rate(last, state.schedule, 14)) == pytest.approx(3e-4, rel=1e-5)


def checkpoint_state(cfg, workdir, step: int):
  setup = state_lib.build(cfg, tokenizer_lib.load_tokenizer(workdir).vocab_size, partitioning.make_mesh(cfg))
  ckpt = checkpoint_lib.Checkpointer(str(workdir))
  with setup.context():
    state, _, _ = ckpt.restore(step, setup.abstract_state)
  ckpt.close()
  return state


def test_the_rng_advances_every_step(text_corpus):
  cfg = tiny_config(**{"data.source": text_corpus})
  setup = state_lib.build(cfg, 64, partitioning.make_mesh(cfg, jax.devices()[:1]))
  step = step_lib.make_train_step(setup)
  keys = []
  with setup.context():
    state = setup.init_state()
    keys.append(np.asarray(jax.device_get(state.rng)).tobytes())
    for i in range(4):
      state, _ = step(state, random_batch(8, 32, 64, seed=i))
      keys.append(np.asarray(jax.device_get(state.rng)).tobytes())
  assert len(set(keys)) == 5
