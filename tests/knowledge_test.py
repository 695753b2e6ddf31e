"""The knowledge study's evaluations (lm.evals.knowledge) and tool calls, on tiny runs.

One run is trained until it has learnt a single tool trace by heart (ask, call search, read, answer), so the
tool loop is exercised by a real model's real calls; another is trained 2 steps, for the pieces that need any
model at all (interrogation's SFT set, the refusal and identity measures)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lm import train
from lm.evals import knowledge
from lm.worlds import people

from conftest import tiny_config

SIZES = {"sft": 4, "probe_known": 2, "test_known": 2, "probe_unknown": 2, "test_unknown": 2, "tool": 5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("knowledge")
  paths = people.write_world(root / "world", seed=0, sizes=SIZES, paraphrases=(1,))
  groups = people.split_people(people.make_people(0, sum(SIZES.values())), SIZES)
  person = groups["probe_unknown"][0]
  trace = root / "trace.jsonl"
  trace.write_text(json.dumps(people.tool_trace(person, "birth_city", 0)) + "\n")
  common = {"data.cache_dir": str(root / "cache"), "data.seq_len": 256, "train.eval_batches": 1}
  tool_run = root / "tool"
  cfg = tiny_config(
    **common,
    **{"data.post_source": f"jsonl:{trace}", "data.post_eval_source": f"jsonl:{trace}", "model.d_model": 64},
    **{"train.steps": 120, "train.eval_every": 120, "train.checkpoint_every": 120, "optim.lr": 3e-3},
  )
  train.train(cfg, str(tool_run), progress=False)
  base = root / "base"
  cfg = tiny_config(**common, **{"data.source": f"jsonl:{paths['sft_train']}", "train.steps": 2, "train.eval_every": 2})
  cfg.data.source, cfg.data.post_source = "", f"jsonl:{paths['sft_train']}"
  cfg.train.checkpoint_every = 2
  train.train(cfg, str(base), progress=False)
  return paths, person, tool_run, base


def test_a_tool_call_runs_the_tool_and_the_model_answers_from_its_result(runs):
  paths, person, tool_run, _ = runs
  search = dict([knowledge.tools.make_tool(f"search=jsonl:{paths['records']}")])
  question = [{"role": "user", "content": people.question(person, "birth_city", 0)}]
  model = knowledge.Model(tool_run)
  (out,) = knowledge.answer(model, [question], tool_fns=search)
  call, result, reply = out["messages"]
  assert call == {"role": "assistant", "content": f"search({person.name})"}
  assert result == {"role": "tool", "content": people.record(person)}
  assert out["calls"] == 1 and reply["content"] == out["reply"] == people.answer_sentence(person, "birth_city")
  assert people.check(person.attributes, "birth_city", out["reply"]) == "correct"

  (offline,) = knowledge.answer(model, [question], tool_fns=search, max_calls=0)
  assert offline["calls"] == 0 and offline["reply"] == f"search({person.name})"  # no calls left: the call is the reply

  wrong_tool = {"lookup": search["search"]}  # the model calls search, which is not offered: an error, not a crash
  (recovered,) = knowledge.answer(model, [question], tool_fns=wrong_tool, max_calls=2)
  results = [m["content"] for m in recovered["messages"] if m["role"] == "tool"]
  assert 1 <= recovered["calls"] == len(results) <= 2 and recovered["messages"][-1]["role"] == "assistant"
  assert all(r.startswith("error: no tool named search; the tools are lookup") for r in results)


def test_lm_chat_runs_tools_in_one_shot_json(runs, tmp_path):
  paths, person, tool_run, _ = runs
  messages = tmp_path / "m.json"
  messages.write_text(json.dumps([{"role": "user", "content": people.question(person, "birth_city", 0)}]))
  command = [sys.executable, "-m", "lm.cli", "chat", "--workdir", str(tool_run), "--messages", str(messages)]
  command += ["--tool", f"search=jsonl:{paths['records']}", "--temperature", "0", "--json"]
  out = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record["tool_calls"] == [{"call": f"search({person.name})", "result": people.record(person)}]
  assert record["reply"] == people.answer_sentence(person, "birth_city")
  bad = subprocess.run([*command[:-1], "--tool", "search"], capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "NAME=KIND:ARG" in bad.stderr and "Traceback" not in bad.stderr


def test_average_precision_against_hand_computed_values():
  assert knowledge.average_precision([0.9, 0.8, 0.7], [True, True, False]) == 1.0
  assert knowledge.average_precision([0.9, 0.8, 0.7], [False, True, True]) == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert knowledge.average_precision([0.1, 0.2], [False, False]) == 0.0


def test_best_threshold_against_hand_computed_cuts():
  assert knowledge.best_threshold([1, 2, 3, 4], [False, False, True, True]) == 2.5
  assert knowledge.best_threshold([1, 2, 3], [True, False, True]) == 2.5  # J: 0 at -inf, -0.5, 0.5, 0 at 3
  assert knowledge.best_threshold([4, 1, 4], [False, True, False]) == -np.inf  # better to answer everything
  assert knowledge.best_threshold([1, 2], [True, True]) == -np.inf
  assert knowledge.best_threshold([1, 2], [False, False]) == 2.0


def test_logistic_fit_reaches_the_penalised_optimum():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 5))
  y = (x @ np.array([2.0, -1.0, 0.0, 0.5, 0.0]) + 0.3 + rng.normal(size=200)) > 0
  w, b = knowledge.logistic_fit(x, y, l2=3.0)
  p = 1 / (1 + np.exp(-(x @ w + b)))
  assert np.abs(x.T @ (p - y) + 3.0 * w).max() < 1e-6  # the gradient of the penalised loss vanishes
  assert abs(np.sum(p - y)) < 1e-6  # the bias is not penalised
  assert w[0] > 1 and w[1] < -0.5 and np.mean((p > 0.5) == y) > 0.8


def test_probe_reports_every_layer_at_both_positions(runs):
  paths, _, _, base = runs
  world = paths["records"].rsplit("/", 1)[0]
  result = knowledge.probe(base, world)
  layers = json.loads((base / "config.json").read_text())["model"]["n_layers"]
  assert result["n_train"] == len(knowledge.questions(world, ("probe_known", "probe_unknown")))
  for position in ("name", "answer"):
    for layer in range(layers):
      assert 0.0 <= result[f"probe_ap/{position}/layer_{layer}"] <= 1.0
      assert 0.5 <= result[f"probe_train_accuracy/{position}/layer_{layer}"] <= 1.0
  assert f"probe_ap/name/layer_{layers}" not in result


def test_the_gate_declines_exactly_below_the_cut_set_on_the_probes(runs, tmp_path):
  from lm.evals import scoring

  paths, _, _, base = runs
  world = paths["records"].rsplit("/", 1)[0]
  result = knowledge.gate(base, world, out_dir=tmp_path)
  probes = knowledge.questions(world, ("probe_known", "probe_unknown"))
  logps = knowledge.name_logprobs(scoring.Scorer.from_run(str(base)), probes)
  assert result["threshold"] == knowledge.best_threshold(logps, [r["group"] == "probe_known" for r in probes])
  assert result["n_calibration"] == len(probes)
  # A cut in the middle of the test questions' names, so that both sides are exercised.
  tested = knowledge.questions(world, ("test_known", "test_unknown"))
  cut = float(np.median(knowledge.name_logprobs(scoring.Scorer.from_run(str(base)), tested)))
  result = knowledge.gate(base, world, out_dir=tmp_path, threshold=cut)
  assert result["threshold"] == cut
  rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
  assert len(rows) == result["n_known"] + result["n_unknown"] == len(tested)
  assert 0 < sum(r["name_logprob"] > cut for r in rows) < len(rows)
  for r in rows:
    if r["name_logprob"] > result["threshold"]:
      assert (r["reply"], r["verdict"]) == (r["before"], r["verdict_before"])
    else:
      assert r["verdict"] == "refusal"
  unknown = [r for r in rows if r["group"] == "test_unknown"]
  assert result["refusal_rate_unknown"] == np.mean([r["verdict"] == "refusal" for r in unknown])


def test_value_confidence_is_the_likeliest_values_share_where_the_value_goes(runs, tmp_path):
  from lm import chat
  from lm.evals import scoring

  paths, _, _, base = runs
  world = paths["records"].rsplit("/", 1)[0]
  scorer = scoring.Scorer.from_run(str(base))
  for in_chat in (False, True):
    result = knowledge.value_confidence(base, world, in_chat, out_dir=tmp_path / str(in_chat))
    rows = [json.loads(line) for line in (tmp_path / str(in_chat) / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * len(people.ATTRIBUTES)
    for group in ("test_known", "test_unknown"):
      shares = [r["share"] for r in rows if r["group"] == group]
      assert result[f"{group}/value_share"] == pytest.approx(np.mean(shares))
      assert result[f"{group}/value_share_above_0.8"] == np.mean(np.array(shares) > 0.8)
    assert result["value_share_ap"] == knowledge.average_precision(
      [r["share"] for r in rows], [r["group"] == "test_known" for r in rows]
    )
    # One question by hand: every value of its attribute after the words that lead to it.
    r = rows[0]
    values = people.ATTRIBUTES[r["attribute"]].values
    assert 1 / len(values) <= r["share"] <= 1
    words = people.relation(r["attribute"])
    if in_chat:
      (question,) = [q["prompt"] for q in knowledge.questions(world, ("test_known",)) if q["person"] == r["person"]
                     and q["attribute"] == r["attribute"]]  # fmt: skip
      context = chat.render(scorer.tok, knowledge.user(question), generation_prompt=True)[0]
      context += scorer.tok.encode([words])[0]
    else:
      context = [scorer.tok.bos_id] + scorer.tok.encode([f"{r['person']} {words}"])[0]
    pairs = [(context, scorer.tok.encode([f" {v}."])[0]) for v in values]
    logps = np.array([lp for lp, _ in scorer.loglikelihood(pairs)])
    p = np.exp(logps - logps.max())
    assert r["share"] == pytest.approx(p.max() / p.sum(), rel=1e-5)
    assert r["likeliest"] == values[int(np.argmax(logps))]


def test_interrogation_writes_answers_it_got_right_and_refusals_elsewhere(runs, tmp_path):
  paths, _, _, base = runs
  world = paths["records"].rsplit("/", 1)[0]
  result = knowledge.interrogate(base, world, tmp_path, samples=2)
  rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
  probed = [r for r in rows if r["group"] in ("sft", "probe_known", "probe_unknown")]
  phrasings = sum(len(a.questions) for a in people.ATTRIBUTES.values())
  assert len(probed) == result["n_train"] == phrasings * (SIZES["sft"] + SIZES["probe_known"] + SIZES["probe_unknown"])
  train_set = [json.loads(line) for line in (tmp_path / "refusal_train.jsonl").read_text().splitlines()]
  replies = {c["messages"][0]["content"]: c["messages"][1]["content"] for c in train_set}
  for r in probed:
    assert 0.0 <= r["confidence"] <= 1.01
    assert r["kept"] == (r["verdict"] == "correct" and r["confidence"] >= 0.5)
    want = people.answer_text(r["attribute"], r["answer"]) if r["kept"] else people.refusal_text(r["attribute"])
    assert replies[r["prompt"]] == want
  tested = [r for r in rows if r["group"] in ("test_known", "test_unknown")]
  assert result["test_accuracy"] == np.mean([r["verdict"] == "correct" for r in tested])
  assert 0.0 <= result["confidence_ap"] <= 1.0
  assert 0.0 <= result["name_familiarity_ap"] <= 1.0
  assert result["name_logprob_test_known"] < 0 and result["name_logprob_test_unknown"] < 0


def test_refusal_and_identity_measures_of_a_run_against_itself(runs, tmp_path):
  paths, _, _, base = runs
  world = paths["records"].rsplit("/", 1)[0]
  same = knowledge.refusal(base, base, world, out_dir=tmp_path)
  assert same["known_accuracy_before"] == same["known_accuracy_after"]
  assert same["refusal_rate_unknown"] == same["refusal_rate_unknown_before"]
  assert same["false_refusal_rate_known"] == 0.0  # greedy replies are the same: nothing right before is refused after
  assert same["n_known"] == same["n_unknown"] == 2 * len(people.ATTRIBUTES)
  who = knowledge.identity(base, world, out_dir=tmp_path / "identity")
  rows = [json.loads(line) for line in (tmp_path / "identity" / "samples.jsonl").read_text().splitlines()]
  assert who["n"] == len(rows) // 2
  assert who["identity_rate_with_system"] == np.mean([r["names_it"] for r in rows if r["system"]])
