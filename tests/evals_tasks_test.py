"""lm eval: task files, few-shot draws, metric arithmetic, the scorer against the model, sharded = one device."""

import dataclasses
import json
import math

import numpy as np
import pytest

from lm import bench, cli, train
from lm import model as model_lib
from lm.errors import UserError
from lm.evals import icl, scoring, tasks

from conftest import run_devices_script, run_lm, tiny_config

LINES = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(12)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny byte-level run trained on sentences of sums, with FSDP over every device it is loaded on."""
  root = tmp_path_factory.mktemp("eval_run")
  (root / "corpus.txt").write_text("\n".join(LINES * 20) + "\n")
  overrides = {"data.source": f"text:{root / 'corpus.txt'}", "train.steps": 30, "data.seq_len": 64}
  train.train(tiny_config(**overrides, **{"mesh.data": 1, "mesh.fsdp": -1}), str(root / "run"), progress=False)
  return root / "run"


@pytest.fixture(scope="module")
def scorer(run):
  return scoring.Scorer.from_run(str(run), batch_size=4)


class FixedScorer:
  """Stands in for a model where the arithmetic of metrics is checked: the log-likelihood of a continuation is
  looked up by its text; generations are given."""

  def __init__(self, tok, logps: dict[str, float] | None = None, outputs: list[str] | None = None):
    self.tok, self.logps, self.outputs = tok, logps or {}, outputs or []

  def loglikelihood(self, requests):
    return [(self.logps[bytes(c[i] - self.tok.offset for i in range(len(c))).decode()], False) for _, c in requests]

  def generate(self, prompts, max_new_tokens, stop=(), stop_ids=()):
    return self.outputs[: len(prompts)]


def test_multiple_choice_acc_and_acc_norm_by_bytes_with_standard_errors():
  from lm.tokenizer import ByteTokenizer  # noqa: PLC0415

  examples = (
    {"q": "1", "choices": ["a", "bbbb"], "answer": 1},  # " a": -1.0 (-1.0 per byte of "a"), " bbbb": -2.0 (-0.5)
    {"q": "2", "choices": ["cc", "d"], "answer": 0},  # " cc": -3.0 (-1.5), " d": -1.4 (-1.4)
    {"q": "3", "choices": ["e", "f"], "answer": 0},  # " e": -0.1, " f": -0.2
  )
  logps = {" a": -1.0, " bbbb": -2.0, " cc": -3.0, " d": -1.4, " e": -0.1, " f": -0.2}
  task = tasks.Task(name="mc", kind="multiple_choice", examples=examples, prompt="{q}:")
  summary, samples = tasks.evaluate(FixedScorer(ByteTokenizer(), logps), task)
  # acc: picks a (wrong), d (wrong), e (right) -> 1/3; acc_norm: bbbb (right), d (wrong), e (right) -> 2/3.
  assert summary["acc"] == pytest.approx(1 / 3) and summary["acc_norm"] == pytest.approx(2 / 3)
  assert summary["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) * 3 / 2 / 3))  # sample sd / sqrt(n)
  assert summary["acc_norm_stderr"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) * 3 / 2 / 3))
  assert [s["pick"] for s in samples] == [0, 1, 0] and [s["pick_norm"] for s in samples] == [1, 1, 0]


def test_exact_match_extracts_answers_checks_and_reports_by_a_field():
  from lm.tokenizer import ByteTokenizer  # noqa: PLC0415

  examples = tuple({"x": str(i), "answer": str(i * 2), "depth": i % 2} for i in range(4))
  outputs = [" 0 ", " answer: 2!", " 4", " 7"]
  task = tasks.Task(name="g", kind="generate", examples=examples, prompt="{x} ->", report_by="depth")
  summary, _ = tasks.evaluate(FixedScorer(ByteTokenizer(), outputs=outputs), task)
  assert summary["exact_match"] == 0.5  # "0" and "4" match; "answer: 2!" is not "2"
  assert summary["exact_match/depth=0"] == 1.0 and summary["exact_match/depth=1"] == 0.0
  regex = tasks.Task(name="g", kind="generate", examples=examples, prompt="{x} ->", answer_regex=r"(\d+)")
  assert tasks.evaluate(FixedScorer(ByteTokenizer(), outputs=outputs), regex)[0]["exact_match"] == 0.75
  checked = tasks.Task(name="g", kind="generate", examples=examples, prompt="{x} ->", check="evals_tasks_test:is_even")
  assert tasks.evaluate(FixedScorer(ByteTokenizer(), outputs=outputs), checked)[0]["exact_match"] == 0.5


def is_even(prediction: str, example: dict) -> bool:
  return prediction.isdigit() and int(prediction) % 2 == 0


def test_few_shot_draws_never_hold_the_example_share_its_group_and_repeat_with_the_seed():
  task = icl.rule_induction(per_rule=10)
  for i, example in enumerate(task.examples):
    shots = tasks.shots_for(task, i, 5, seed=3)
    assert example not in shots and len({s["word"] for s in shots}) == 5
    assert all(s["rule"] == example["rule"] for s in shots)
    assert shots == tasks.shots_for(task, i, 5, seed=3)
  assert tasks.shots_for(task, 0, 5, seed=3) != tasks.shots_for(task, 0, 5, seed=4)
  separate = tasks.Task(name="s", kind="generate", examples=({"a": 1},), fewshot_examples=({"a": 2}, {"a": 3}))
  assert sorted(s["a"] for s in tasks.shots_for(separate, 0, 2, seed=0)) == [2, 3]
  with pytest.raises(UserError, match="3 shots asked, but example 0 has only 2"):
    tasks.shots_for(separate, 0, 3, seed=0)
  prompt = tasks.prompt_text(task, task.examples[0], tasks.shots_for(task, 0, 2, seed=0))
  assert prompt.count("\n") == 2 and prompt.endswith(f"{task.examples[0]['word']} ->")


def test_built_in_tasks_are_fixed_and_cover_their_groups_under_a_limit():
  recall = icl.kv_recall()
  assert recall.examples == icl.kv_recall().examples and len(recall.examples) == 200
  assert len(icl.kv_recall_long().examples[0]["choices"]) == 32
  assert {e["depth"] for e in recall.examples[:5]} == set(icl.DEPTHS)
  for e in recall.examples[:10]:
    lines = e["pairs"].split("\n")
    assert lines[round(e["depth"] * (len(lines) - 1))] == f"{e['key']}={e['choices'][e['answer']]}"
    assert sorted(e["choices"]) == sorted(line.split("=")[1] for line in lines)
  rules = icl.rule_induction()
  assert {e["rule"] for e in rules.examples[:4]} == set(icl.RULES)
  assert all(icl.RULES[e["rule"]](e["word"]) == e["choices"][e["answer"]] for e in rules.examples)
  assert all(len(set(e["choices"])) == 4 for e in rules.examples)


def test_the_scorer_sums_the_models_log_probs(run, scorer):
  tok = scorer.tok
  context, continuation = [tok.bos_id] + tok.encode(["3 plus 4 is"])[0], tok.encode([" 7."])[0]
  (logp, greedy), (logp_wrong, _) = scorer.loglikelihood([(context, continuation), (context, tok.encode([" 9."])[0])])
  ids = np.asarray([context + continuation])
  n = ids.shape[1] - 1
  batch = {"inputs": ids[:, :-1], "segment_ids": np.ones((1, n), np.int32), "positions": np.arange(n)[None]}
  logits = np.asarray(model_lib.forward(scorer.setup.model, scorer.params, batch))[0]
  logp_all = (
    logits
    - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  want = sum(logp_all[t, ids[0, t + 1]] for t in range(len(context) - 1, n))
  assert logp == pytest.approx(want, abs=1e-4)
  assert greedy == all(logits[t].argmax() == ids[0, t + 1] for t in range(len(context) - 1, n))
  assert logp > logp_wrong  # it learnt the sums, a little
  # A document longer than the context is scored in windows: every token once.
  doc = tok.encode([" ".join(LINES[:12])])[0]
  assert len(doc) > 2 * scorer.context
  (rolling,) = scorer.loglikelihood_rolling([doc])
  tail = len(doc) - 128
  assert 0 < tail < 64  # two whole windows of 64 and a shorter last one
  windows = [([tok.bos_id], doc[:64]), (doc[63:64], doc[64:128]), (doc[-65:-tail], doc[128:])]
  assert len(windows[2][0]) == 65 - tail  # the last window: its n tokens after the 64 + 1 - n before them
  assert rolling == pytest.approx(sum(lp for lp, _ in scorer.loglikelihood(windows)), abs=1e-3)


def test_requests_packed_into_one_row_score_as_they_do_alone(scorer, capsys):
  tok = scorer.tok
  pairs = [([tok.bos_id] + tok.encode([f"{a} plus {b} is"])[0], tok.encode([f" {a + b}."])[0]) for a, b in
           [(1, 2), (10, 11), (3, 3), (7, 9), (0, 0), (11, 5)]]  # fmt: skip
  packed = scorer.loglikelihood(pairs, "sums", progress=True)
  shown = [line for line in capsys.readouterr().err.replace("\r", "\n").split("\n") if line.startswith("sums")]
  assert "/6 [" in shown[0] and "request" in shown[0]  # the bar counts the 6 requests, not the one batch
  assert len(scoring.best_fit([len(c) + len(x) - 1 for c, x in pairs], scorer.context)) == 2  # six in two rows
  alone = [scorer.loglikelihood([p])[0] for p in pairs]
  assert [g for _, g in packed] == [g for _, g in alone]
  np.testing.assert_allclose([lp for lp, _ in packed], [lp for lp, _ in alone], atol=1e-5)
  assert len({lp for lp, _ in packed}) > 1  # the segments do not see each other: different sums


def test_a_moe_that_drops_tokens_scores_each_request_in_a_row_of_its_own(tmp_path):
  """Experts with a capacity drop the tokens beyond it, and a row's tokens compete for it: no packing there."""
  (tmp_path / "corpus.txt").write_text("\n".join(LINES * 4) + "\n")
  moe = {"model.moe.experts": 4, "model.moe.top_k": 1, "model.moe.capacity_factor": 0.5}
  cfg = tiny_config(**{"data.source": f"text:{tmp_path / 'corpus.txt'}", "train.steps": 2, "data.seq_len": 64}, **moe)
  train.train(cfg, str(tmp_path / "run"), progress=False)
  scorer = scoring.Scorer.from_run(str(tmp_path / "run"), batch_size=4)
  tok = scorer.tok
  pairs = [([tok.bos_id] + tok.encode([f"{a} plus {a} is"])[0], tok.encode([f" {2 * a}."])[0]) for a in range(6)]
  alone = [scorer.loglikelihood([p])[0][0] for p in pairs]
  assert [lp for lp, _ in scorer.loglikelihood(pairs)] == alone
  # Packed anyway (the scorer told the experts were dropless), the neighbours' tokens take slots and scores move.
  dropless = dataclasses.replace(scorer.setup.model_cfg.moe, capacity_factor=0.0)
  told = dataclasses.replace(scorer.setup, model_cfg=dataclasses.replace(scorer.setup.model_cfg, moe=dropless))
  packed = [lp for lp, _ in dataclasses.replace(scorer, setup=told).loglikelihood(pairs)]
  assert np.abs(np.array(packed) - alone).max() > 0.1


def test_best_fit_groups_every_request_once_longest_first_into_the_fullest_row_with_room():
  lengths = [5, 60, 30, 30, 64, 1, 33]
  rows = scoring.best_fit(lengths, 64)
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
  assert rows == [[4], [1], [6, 2, 5], [3, 0]]  # 5 (length 1) fills row 2 exactly, not row 1


def test_perplexity_is_bits_per_byte_of_the_rolling_log_likelihoods(run, scorer, tmp_path):
  docs = [" ".join(LINES[i : i + 3]) for i in range(0, 30, 3)]
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  task = tasks.Task(name="ppl", kind="perplexity", source=f"all:jsonl:{tmp_path / 'docs.jsonl'}")
  summary, samples = tasks.evaluate(scorer, task)
  logps = scorer.loglikelihood_rolling(scorer.tok.encode(docs))
  bits = -sum(logps) / sum(len(d.encode()) for d in docs) / math.log(2)
  assert summary["n"] == 10 and summary["bits_per_byte"] == pytest.approx(bits, rel=1e-6)
  assert summary["byte_perplexity"] == pytest.approx(2**bits) and 0 < summary["bits_per_byte_stderr"] < bits
  assert [s["logprob"] for s in samples] == pytest.approx(logps)


def test_generation_stops_at_the_stop_string(scorer):
  prompt = [scorer.tok.bos_id] + scorer.tok.encode(["5 plus 6 is"])[0]
  (longer,) = scorer.generate([prompt], 30)
  stop = longer[6:9]  # whatever this barely trained model writes, cut it at its seventh character
  (text,) = scorer.generate([prompt], 30, stop=(stop, "never written"))
  assert len(longer) == 30 and text == longer[: longer.index(stop)]


def test_a_sharded_evaluation_equals_one_device(run, scorer):
  task = icl.counting(n=8)
  summary, samples = tasks.evaluate(scorer, task, shots=2)
  requests = [
    ([scorer.tok.bos_id] + scorer.tok.encode([line[:10]])[0], scorer.tok.encode([line[10:]])[0]) for line in LINES[:6]
  ]
  here = [lp for lp, _ in scorer.loglikelihood(requests)]
  code = f"""
import json
from lm.evals import icl, scoring, tasks
scorer = scoring.Scorer.from_run({str(run)!r}, batch_size=4)
summary, samples = tasks.evaluate(scorer, icl.counting(n=8), shots=2)
logps = [lp for lp, _ in scorer.loglikelihood({requests!r})]
outputs = [s["output"] for s in samples]
found = {{"devices": scorer.setup.mesh.size, "batch": scorer.batch_size, "outputs": outputs, "logps": logps}}
print(json.dumps({{**found, "summary": summary}}))
"""
  there = run_devices_script(code, devices=4)
  assert there["devices"] == 4 and there["batch"] == 4  # FSDP over the 4 devices, rows split over them
  assert there["outputs"] == [s["output"] for s in samples] and there["summary"] == summary
  np.testing.assert_allclose(there["logps"], here, atol=1e-5)


def test_lm_eval_prints_a_json_line_per_task_and_writes_its_records(run, tmp_path):
  (tmp_path / "sums.jsonl").write_text(
    "".join(
      json.dumps({"a": a, "b": b, "choices": [str(a + b), str(a + b + 1)], "answer": 0}) + "\n"
      for a, b in [(1, 2), (3, 4), (5, 5)]
    )
  )
  (tmp_path / "sums.json").write_text(
    json.dumps({"kind": "multiple_choice", "examples": "sums.jsonl", "prompt": "{a} plus {b} is"})
  )
  tasks_arg = f"{tmp_path / 'sums.json'},counting"
  out = run_lm("eval", "--workdir", run, "--tasks", tasks_arg, "--limit", 6, "--shots", 1, "--out", tmp_path / "r.json")
  lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [(r["task"], r["shots"], r["n"]) for r in lines] == [("sums", 1, 3), ("counting", 1, 6)]
  assert set(lines[0]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} and "exact_match" in lines[1]
  record = json.loads((tmp_path / "r.json").read_text())
  assert record["results"] == lines and len(record["samples"]["counting"]) == 6


@pytest.mark.parametrize(
  "argv, message",
  [
    (
      ["--tasks", "nope"],
      "unknown task 'nope': built-in tasks are rule_induction, kv_recall, kv_recall_long, counting",
    ),
    (["--tasks", "missing.json"], "cannot read task file missing.json"),
    ([], "lm eval needs --tasks"),
  ],
)
def test_bad_tasks_are_one_line_errors(run, argv, message):
  out = run_lm("eval", "--workdir", run, *argv, check=False)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr


def test_a_task_file_naming_a_field_its_examples_lack_is_an_error(tmp_path):
  (tmp_path / "t.jsonl").write_text(json.dumps({"x": 1}) + "\n")
  (tmp_path / "t.json").write_text(json.dumps({"kind": "generate", "examples": "t.jsonl", "prompt": "{y}"}))
  task = tasks.load_task_file(str(tmp_path / "t.json"))
  with pytest.raises(UserError, match=r"t: the template '\{y\}' names 'y', which the example lacks"):
    tasks.prompt_text(task, task.examples[0], [])
  (tmp_path / "u.json").write_text(json.dumps({"kind": "generate", "examples": "t.jsonl", "promt": "{x}"}))
  with pytest.raises(UserError, match="unknown keys promt"):
    tasks.load_task_file(str(tmp_path / "u.json"))


def test_train_evals_log_downstream_metrics_at_every_eval(tmp_path):
  (tmp_path / "corpus.txt").write_text("\n".join(LINES * 5) + "\n")
  source = f"text:{tmp_path / 'corpus.txt'}"
  overrides = {"data.source": source, "train.steps": 4, "train.eval_every": 2, "data.seq_len": 64}
  overrides |= {"train.evals": ("counting", f"sums=bpb:all:{source}"), "train.evals_limit": 6, "train.evals_shots": 1}
  train.train(tiny_config(**overrides), str(tmp_path / "run"), progress=False)
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval/counting/exact_match" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert all(0 <= r["eval/counting/exact_match"] <= 1 and r["eval/sums/bits_per_byte"] > 0 for r in evals)
  assert evals[1]["eval/sums/bits_per_byte"] < evals[0]["eval/sums/bits_per_byte"]  # it learns the sums
  scorer = scoring.Scorer.from_run(str(tmp_path / "run"))
  again, _ = tasks.evaluate(scorer, dataclasses.replace(icl.counting(), name="c"), shots=1, limit=6, seed=0)
  assert again["exact_match"] == evals[1]["eval/counting/exact_match"]  # the same numbers lm eval gives


def test_chat_prompts_are_turns_of_the_chat_template_and_replies_end_at_end_of_turn():
  from lm import chat  # noqa: PLC0415
  from lm.tokenizer import ByteTokenizer  # noqa: PLC0415

  tok = ByteTokenizer()
  task = tasks.Task(
    name="c",
    kind="generate",
    examples=({"x": "2", "answer": "4"}, {"x": "3", "answer": "6"}),
    prompt="double {x}",
    description="Be brief.",
  )
  shot = tasks.shots_for(task, 0, 1, seed=0)
  ids = tasks.prompt_ids(tok, task, task.examples[0], shot, use_chat=True)
  messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "double 3"},
    {"role": "assistant", "content": "6"},
    {"role": "user", "content": "double 2"},
  ]
  assert ids == chat.render(tok, messages, generation_prompt=True)[0]

  class Recorder(FixedScorer):
    def generate(self, prompts, max_new_tokens, stop=(), stop_ids=()):
      self.stop_ids = stop_ids
      return [" 4", "5"]

  recorder = Recorder(tok)
  summary, _ = tasks.evaluate(recorder, task, shots=1, use_chat=True)
  assert recorder.stop_ids == (tok.special["<|end|>"],) and summary["exact_match"] == 0.5


def test_bench_score_scores_the_same_packed_and_one_a_row(run):
  record = bench.score_throughput(str(run), requests=24)
  assert record["requests"] == 24 and record["context"] == 64
  assert record["packed_requests_per_s"] > 0 and record["one_a_row_requests_per_s"] > 0
  assert record["max_abs_logp_diff"] < 1e-4
  with pytest.raises(UserError, match="--requests of at least 1"):
    bench.score_throughput(str(run), requests=0)


def test_bench_score_and_hf_refuse_the_config_overrides_they_would_ignore(run, capsys):
  assert cli.main(["bench", "score", "--workdir", str(run), "--config.eval.batch_size=4"]) == 2
  assert "run's own config (--workdir); it takes no --config.eval.batch_size=4" in capsys.readouterr().err
  assert cli.main(["bench", "hf", "--config", "experiments/quickstart.py"]) == 2  # before any model is built
  assert "SmolLM-135M's shapes, built in the benchmark; it takes no --config experiments/" in capsys.readouterr().err
