"""The post-training evaluations (`lm.evals.instruct`) on tiny runs trained for 2 steps on a small instruction
world: they run end to end, and their pieces are right (the chat prompt, batching, the judge's symmetry, rewards
read at each sequence's last token). A 2-step model answers nothing right, so no test asks for accuracy."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from lm import chat, sampling, tokenizer, train
from lm import workdir as workdir_lib
from lm.config import load_module
from lm.errors import UserError
from lm.evals import instruct
from lm.tokenizer import load_tokenizer
from lm.worlds import instructions

from conftest import tiny_config

EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The world's files, two language-model runs (a and b, different seeds) and a reward model (rm)."""
  root = tmp_path_factory.mktemp("evals_instruct")
  paths = instructions.write_world(root / "world", seed=0, n_train=20, n_eval=12, n_pairs=10, n_pretrain=60)
  settings = {
    "data.source": f"jsonl:{paths['pretrain']}",
    "data.cache_dir": str(root / "cache"),
    "data.seq_len": 128,
    "data.eval_fraction": 0.1,
    "train.steps": 2,
    "train.eval_every": 2,
    "train.eval_batches": 1,
    "train.checkpoint_every": 2,
  }
  rm = {"train.objective": "reward", "data.post_source": f"jsonl:{paths['prefs_train']}", "data.eval_fraction": 0.3}
  runs = {}
  for name, extra in {"a": {}, "b": {"train.seed": 1}, "rm": rm}.items():
    runs[name] = root / name
    train.train(tiny_config(**{**settings, **extra}), str(runs[name]), progress=False)
  return paths, runs


def samples(out_dir) -> list[dict]:
  return [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]


def test_chat_accuracy_prompts_with_the_chat_template_and_batches_as_one_at_a_time(world, tmp_path, monkeypatch):
  paths, runs = world
  prompts = []
  generate = sampling.Sampler.generate

  def recording(self, params, prompts_, requests):
    prompts.append(prompts_)
    return generate(self, params, prompts_, requests)

  monkeypatch.setattr(sampling.Sampler, "generate", recording)
  args = (runs["a"], paths["eval"])
  result = instruct.chat_accuracy(*args, n=9, max_new_tokens=16, batch_size=4, out_dir=tmp_path / "batched")
  examples = instructions.read_examples(paths["eval"])[:9]
  tok = load_tokenizer(runs["a"])
  expected = [chat.render(tok, [{"role": "user", "content": e.prompt}], generation_prompt=True)[0] for e in examples]
  assert [len(p) for p in prompts] == [4, 4, 4]  # the last batch padded with copies of its first prompt
  assert sum(prompts, [])[:9] == expected and prompts[-1] == [expected[8]] * 4
  batched = samples(tmp_path / "batched")
  assert [s["prompt"] for s in batched] == [e.prompt for e in examples]
  assert result["n"] == 9 and result["accuracy"] == np.mean([s["correct"] for s in batched])
  tasks = sorted({e.task for e in examples})
  assert [k for k in result if k.startswith("accuracy/")] == [f"accuracy/{t}" for t in tasks]
  for t in tasks:
    assert result[f"accuracy/{t}"] == np.mean([s["correct"] for s in batched if s["task"] == t])
  assert (
    all(0 <= result[k] <= 1 for k in ("accuracy", "ended_turn", "preferred_style")) and result["prompts_per_second"]
  )
  single = instruct.chat_accuracy(*args, n=9, max_new_tokens=16, batch_size=1, out_dir=tmp_path / "single")
  assert samples(tmp_path / "single") == batched and single["accuracy"] == result["accuracy"]
  # Sampled replies do not depend on the batch either: example i has its own seed.
  sampled = {}
  for batch_size in (4, 1):
    out_dir = tmp_path / f"sampled_{batch_size}"
    instruct.chat_accuracy(*args, n=9, max_new_tokens=16, temperature=1.0, batch_size=batch_size, out_dir=out_dir)
    sampled[batch_size] = samples(out_dir)
  assert sampled[4] == sampled[1] and sampled[4] != batched
  # Several samples an example: the first round is the one-sample run's, the accuracy the mean over every reply.
  twice = instruct.chat_accuracy(
    *args, n=9, max_new_tokens=16, temperature=1.0, batch_size=4, out_dir=tmp_path / "twice", samples=2
  )
  rows = samples(tmp_path / "twice")
  assert len(rows) == 18 and rows[:9] == sampled[4] and [r["prompt"] for r in rows[9:]] == [e.prompt for e in examples]
  assert twice["n"] == 9 and twice["samples"] == 2 and twice["accuracy"] == np.mean([r["correct"] for r in rows])
  with pytest.raises(UserError, match="samples"):
    instruct.chat_accuracy(*args, n=9, samples=2)  # greedy replies would all be the same


def test_plain_prompts_ask_as_the_pretraining_text_and_the_reply_is_the_first_line(world, tmp_path, monkeypatch):
  paths, runs = world
  calls = []
  generate = sampling.Sampler.generate

  def recording(self, params, prompts_, requests):
    out = generate(self, params, prompts_, requests)
    calls.append((prompts_, out))
    return out

  monkeypatch.setattr(sampling.Sampler, "generate", recording)
  result = instruct.chat_accuracy(
    runs["a"], paths["eval"], n=5, max_new_tokens=24, batch_size=5, out_dir=tmp_path, prompt_format="plain"
  )
  examples = instructions.read_examples(paths["eval"])[:5]
  tok = load_tokenizer(runs["a"])
  [(prompts, raw)] = calls
  assert prompts == [[tokenizer.BOS_ID] + tok.encode([f"Q: {e.prompt}\nA:"])[0] for e in examples]
  replies = [s["reply"] for s in samples(tmp_path)]
  assert replies == [g.text.split("\n")[0] for g in raw]
  assert [s["ended_turn"] for s in samples(tmp_path)] == ["\n" in g.text for g in raw]
  assert result["accuracy"] == np.mean([instructions.score(e, r) for e, r in zip(examples, replies, strict=True)])
  with pytest.raises(UserError, match="prompt_format"):
    instruct.chat_accuracy(runs["a"], paths["eval"], n=1, prompt_format="qa")


def test_win_rate_of_a_run_against_itself_is_one_half_and_swapping_the_runs_flips_it(world, tmp_path):
  paths, runs = world
  same = instruct.win_rate(runs["a"], runs["a"], paths["eval"], n=8, max_new_tokens=16, out_dir=tmp_path / "same")
  assert same["win_rate"] == 0.5 and same["n"] == 8
  assert all(s["reply_a"] == s["reply_b"] for s in samples(tmp_path / "same"))
  ab = instruct.win_rate(runs["a"], runs["b"], paths["eval"], n=8, max_new_tokens=16, out_dir=tmp_path / "ab")
  ba = instruct.win_rate(runs["b"], runs["a"], paths["eval"], n=8, max_new_tokens=16)
  rows = samples(tmp_path / "ab")
  assert any(s["reply_a"] != s["reply_b"] for s in rows)
  assert ab["win_rate"] == np.mean([s["judge"] for s in rows]) and ba["win_rate"] == 1 - ab["win_rate"]
  assert (ab["accuracy_a"], ab["accuracy_b"]) == (ba["accuracy_b"], ba["accuracy_a"])
  assert (ab["accuracy_a"], ab["preferred_style_a"]) == (same["accuracy_a"], same["preferred_style_a"])


def test_reward_accuracy_reads_each_sequence_at_its_last_token(world, tmp_path):
  paths, runs = world
  result = instruct.reward_accuracy(runs["rm"], paths["prefs_eval"], n=5, batch_size=4, out_dir=tmp_path)
  assert result["n"] == 5 and result["dropped"] == result["truncated"] == 0 and 0 <= result["accuracy"] <= 1
  rows = samples(tmp_path)
  assert [r["where"] for r in rows] == [f"{paths['prefs_eval']}:{i}" for i in range(1, 6)]
  assert result["margin"] == pytest.approx(np.mean([r["reward_chosen"] - r["reward_rejected"] for r in rows]))
  # One sequence at a time, unpadded: the model's score at the sequence's last token, its <|end|>.
  cfg, tok, setup, params = workdir_lib.load_params(str(runs["rm"]))
  pairs = [json.loads(line) for line in paths["prefs_eval"].read_text().splitlines()][:5]
  for pair, row in zip(pairs, rows, strict=True):
    prompt = [{"role": "user", "content": pair["prompt"]}]
    for key in ("chosen", "rejected"):
      ids, _ = chat.render_continuation(tok, prompt, [{"role": "assistant", "content": pair[key]}])
      with setup.context():
        scores = setup.model.apply({"params": params}, jnp.asarray([ids]))
      assert row[f"reward_{key}"] == pytest.approx(float(scores[0, -1]), abs=1e-5)
  assert len({r["reward_chosen"] for r in rows}) > 1  # the head has learned something
  # Chosen and rejected swapped: every comparison turns round.
  swapped = tmp_path / "swapped.jsonl"
  swapped.write_text("".join(json.dumps({**p, "chosen": p["rejected"], "rejected": p["chosen"]}) + "\n" for p in pairs))
  flipped = instruct.reward_accuracy(runs["rm"], swapped, batch_size=4)
  assert flipped["accuracy"] == 1 - result["accuracy"] and flipped["margin"] == pytest.approx(-result["margin"])


def test_bad_input_is_a_one_line_error(world, tmp_path):
  paths, runs = world
  with pytest.raises(UserError, match=r"is not a reward model: its model's head is 'lm', not 'scalar'"):
    instruct.reward_accuracy(runs["a"], paths["prefs_eval"])
  with pytest.raises(UserError, match=r"batch_size must be a positive even number"):
    instruct.reward_accuracy(runs["a"], paths["prefs_eval"], batch_size=3)
  with pytest.raises(UserError, match=f"no examples file {tmp_path}/nope.jsonl"):
    instruct.chat_accuracy(runs["a"], tmp_path / "nope.jsonl")
  with pytest.raises(UserError, match="n must be at least 1, got 0"):
    instruct.win_rate(runs["a"], runs["b"], paths["eval"], n=0)


def test_reward_and_kl_of_a_run_against_itself_is_zero_and_the_frontier_plots_every_checkpoint(world, tmp_path):
  paths, runs = world
  same = instruct.reward_and_kl(runs["a"], runs["a"], runs["rm"], paths["eval"], n=6, max_new_tokens=12)
  assert same["kl"] == 0.0 and same["step"] == 2 and same["n"] == 6 and np.isfinite(same["reward"])
  other = instruct.reward_and_kl(runs["a"], runs["b"], runs["rm"], paths["eval"], n=6, max_new_tokens=12)
  assert other["kl"] != 0.0 and other["reward"] == same["reward"]  # the same replies, scored by the same model
  points = instruct.frontier({"b": runs["b"]}, runs["a"], runs["rm"], paths["eval"], tmp_path, n=6)
  assert [p["step"] for p in points["b"]] == [2] and points["reference"][0]["kl"] == 0.0
  assert points["b"][0]["kl"] == pytest.approx(
    instruct.reward_and_kl(runs["b"], runs["a"], runs["rm"], paths["eval"], n=6)["kl"]
  )
  assert (tmp_path / "frontier.png").stat().st_size > 0
  assert json.loads((tmp_path / "frontier.json").read_text()) == points


def test_sampled_pairs_are_a_runs_own_replies_ranked_by_the_hidden_rule(world, tmp_path):
  paths, runs = world
  counts = instruct.sampled_pairs(runs["a"], paths["eval"], tmp_path / "pairs.jsonl", n=10)
  pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
  examples = {e.prompt: e for e in instructions.read_examples(paths["eval"])[:10]}
  assert counts["pairs"] == len(pairs) and counts["pairs"] + counts["ties"] == 10
  assert counts["neither_correct"] + counts["one_correct"] + counts["both_correct"] == counts["pairs"]
  first, _ = instruct.replies(runs["a"], list(examples.values()), instruct.MAX_NEW_TOKENS, 1.0, 0, 64)
  for pair in pairs:
    assert instructions.judge(examples[pair["prompt"]], pair["chosen"], pair["rejected"]) == 1.0
  assert all(p["chosen"] in {g.text for g in first} or p["rejected"] in {g.text for g in first} for p in pairs)


def test_paired_counts_gains_and_losses_and_gives_mcnemars_exact_p(tmp_path):
  def write(name, correct):
    d = tmp_path / name
    instruct.write_samples(d, [{"prompt": str(i), "correct": c} for i, c in enumerate(correct)])
    return d

  before = write("a", [True, False, False, True, False, True])
  after = write("b", [True, True, True, False, False, True])
  got = instruct.paired(before, after)
  assert (got["gained"], got["lost"], got["n"]) == (2, 1, 6)
  assert got["p_value"] == pytest.approx(1.0)  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8, capped at 1
  lopsided = instruct.paired(write("c", [False] * 10), write("d", [True] * 9 + [False]))
  assert (lopsided["gained"], lopsided["lost"]) == (9, 0)
  assert lopsided["p_value"] == pytest.approx(2 / 2**9)
  assert instruct.paired(before, before)["p_value"] == 1.0
  with pytest.raises(UserError, match="same examples"):
    instruct.paired(before, write("e", [True] * 5))


def test_the_rl_chain_compares_grpo_with_sft_on_the_test_examples(world, tmp_path):
  """experiments/instruct_rl.py's final comparison answers test.jsonl (not eval.jsonl, on which settings were
  chosen) with both runs and pairs their replies; here "sft" and "grpo" are the two tiny runs."""
  paths, runs = world
  chain = load_module(str(EXPERIMENTS / "instruct_rl.py"))
  workdir = tmp_path / "chain"
  (workdir / "world").mkdir(parents=True)
  test = paths["test"].read_text().splitlines()[:20]
  (workdir / "world" / "test.jsonl").write_text("\n".join(test) + "\n")
  (workdir / "sft").symlink_to(runs["a"])
  (workdir / "grpo").symlink_to(runs["b"])
  stages = {s["id"]: s for s in chain.get_study(str(workdir))}
  ids = list(stages)
  assert ids.index("sft_test") < ids.index("grpo_vs_sft") and ids.index("grpo_test") < ids.index("grpo_vs_sft")
  results = {i: stages[i]["run"](str(workdir / i)) for i in ("sft_test", "grpo_test", "grpo_vs_sft")}
  prompts = [json.loads(line)["prompt"] for line in test]
  for run in ("sft_test", "grpo_test"):
    assert results[run]["n"] == 20 and [s["prompt"] for s in samples(workdir / run)] == prompts
  assert results["grpo_vs_sft"] == instruct.paired(workdir / "sft_test", workdir / "grpo_test")
