"""lm.evals.harness: a tiny run scored by EleutherAI's lm-evaluation-harness on a task written here, offline.

The adapter's answers are checked against the Scorer and against logits computed directly; the harness's
reported accuracies against ones computed by hand from the same log-likelihoods.
"""

import json
import os
import socket

import jax
import numpy as np
import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: it reads them once
os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from lm import model as model_lib  # noqa: E402
from lm import train  # noqa: E402
from lm.errors import UserError  # noqa: E402
from lm.evals import harness  # noqa: E402
from lm.evals.scoring import Scorer  # noqa: E402

from conftest import run_lm, tiny_config  # noqa: E402

TASK = "lm_sums"


def sums(n: int, seed: int) -> list[tuple[int, int]]:
  rng = np.random.default_rng(seed)
  return [tuple(int(x) for x in rng.integers(0, 50, 2)) for _ in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny byte-level run trained for 20 steps on lines like "12 + 30 = 42"."""
  root = tmp_path_factory.mktemp("harness_run")
  (root / "corpus.txt").write_text("".join(f"{a} + {b} = {a + b}\n" for a, b in sums(3000, seed=0)))
  overrides = {"data.source": f"text:{root / 'corpus.txt'}", "train.steps": 20, "data.seq_len": 64}
  train.train(tiny_config(**overrides), str(root / "run"), progress=False)
  return str(root / "run")


@pytest.fixture(scope="module")
def scorer(run):
  return Scorer.from_run(run, batch_size=8)


@pytest.fixture(scope="module")
def docs():
  """20 sums, each with three ASCII choices of different lengths; the right one is first, second or third."""
  out = []
  for i, (a, b) in enumerate(sums(20, seed=1)):
    choices = [str(a + b), str(a + b + 101), str(a + b + 7)]
    gold = i % 3
    choices[0], choices[gold] = choices[gold], choices[0]
    out.append({"question": f"{a} + {b} =", "choices": choices, "label": gold})
  return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, docs):
  """A harness task read from a local JSONL: `dataset_path: json`, nothing from the Hub."""
  root = tmp_path_factory.mktemp("harness_tasks")
  (root / "sums.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (root / f"{TASK}.yaml").write_text(
    "\n".join(
      [
        f"task: {TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {root / 'sums.jsonl'}}}",
        f"  cache_dir: {root / 'hf_cache'}",
        "output_type: multiple_choice",
        "test_split: test",
        'doc_to_text: "{{question}}"',
        "doc_to_choice: choices",
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc",
        "  - metric: acc_norm",
        "metadata: {version: 1.0}",
        "",
      ]
    )
  )
  (root / "lm_hub_only.yaml").write_text(
    "task: lm_hub_only\ndataset_path: nobody/no_such_dataset\noutput_type: loglikelihood_rolling\n"
    "test_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list: [{metric: word_perplexity}]\n"
  )
  return str(root)


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to open a connection fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_scorers_on_the_same_tokens(scorer):
  model, tok = harness.LMEvalModel(scorer), scorer.tok
  pairs = [("1 + 2 =", " 3"), ("", "7 + 7 = 14"), ("40 + 2 = ", "42"), ("3 +\n", "4")]
  got = model.loglikelihood(requests("loglikelihood", pairs))
  # Trailing whitespace moves from the context to the continuation; an empty context is bos alone.
  tokens = [
    ([tok.bos_id, *tok.encode(["1 + 2 ="])[0]], tok.encode([" 3"])[0]),
    ([tok.bos_id], tok.encode(["7 + 7 = 14"])[0]),
    ([tok.bos_id, *tok.encode(["40 + 2 ="])[0]], tok.encode([" 42"])[0]),
    ([tok.bos_id, *tok.encode(["3 +"])[0]], tok.encode(["\n4"])[0]),
  ]
  assert got == scorer.loglikelihood(tokens)
  assert all(isinstance(lp, float) and isinstance(g, bool) for lp, g in got)


def test_loglikelihood_rolling_sums_the_models_token_log_probs(scorer):
  text = "17 + 25 = 42\n3 + 4 = 7\n"
  (got,) = harness.LMEvalModel(scorer).loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
  tokens = [scorer.tok.bos_id, *scorer.tok.encode([text])[0]]
  n = len(tokens) - 1
  assert n < scorer.context
  batch = {
    "inputs": np.array([tokens[:-1]], np.int32),
    "segment_ids": np.ones((1, n), np.int32),
    "positions": np.arange(n, dtype=np.int32)[None],
  }
  logits_1xTxV = model_lib.forward(scorer.setup.model, scorer.params, batch)
  logp_1xTxV = np.asarray(jax.nn.log_softmax(logits_1xTxV.astype(np.float32), axis=-1))
  want = logp_1xTxV[0, np.arange(n), tokens[1:]].sum()
  assert abs(got - want) < 1e-4, (got, want)


def test_generate_until_stops_before_the_stop_string(scorer):
  prompt = "12 + 30 ="
  raw = scorer.generate([[scorer.tok.bos_id, *scorer.tok.encode([prompt])[0]]], 16)[0]
  assert len(raw) >= 4, raw
  until = raw[2:4]  # text the model does produce, so the cut is exercised
  model = harness.LMEvalModel(scorer)
  gen_kwargs = {"until": [until], "max_gen_toks": 16, "do_sample": False}
  (got,) = model.generate_until(requests("generate_until", [(prompt, gen_kwargs)]))
  assert got == raw[: raw.index(until)] and until not in got, (raw, until, got)
  with pytest.raises(UserError, match="greedily"):
    model.generate_until(requests("generate_until", [(prompt, {"until": ["\n"], "do_sample": True})]))


def test_the_harness_reports_the_accuracy_of_the_scorers_log_likelihoods(run, scorer, docs, task_dir, no_network):
  results = harness.run_harness(run, [TASK], include_path=task_dir, batch_size=8)
  assert set(results) == {TASK}
  got = results[TASK]
  assert got["n"] == len(docs)
  tok = scorer.tok
  pairs = [
    ([tok.bos_id, *tok.encode([d["question"]])[0]], tok.encode([" " + c])[0]) for d in docs for c in d["choices"]
  ]
  lls_Nx3 = np.array([lp for lp, _ in scorer.loglikelihood(pairs)]).reshape(len(docs), 3)
  labels_N = np.array([d["label"] for d in docs])
  chars_Nx3 = np.array([[len(c) for c in d["choices"]] for d in docs])  # the harness divides by characters
  acc = np.mean(lls_Nx3.argmax(1) == labels_N)
  acc_norm = np.mean((lls_Nx3 / chars_Nx3).argmax(1) == labels_N)
  print(f"{TASK}: acc {got['acc']:.3f}, acc_norm {got['acc_norm']:.3f} (by hand {acc:.3f}, {acc_norm:.3f})")
  assert got["acc"] == pytest.approx(acc, abs=1e-12)
  assert got["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
  assert got["acc_stderr"] == pytest.approx(np.std(lls_Nx3.argmax(1) == labels_N, ddof=1) / np.sqrt(len(docs)))
  json.dumps(results, allow_nan=False)
  limited = harness.run_harness(run, [TASK], include_path=task_dir, limit=5)
  assert limited[TASK]["n"] == 5


def test_an_unknown_task_is_a_one_line_user_error(run, task_dir):
  with pytest.raises(UserError, match="unknown lm-evaluation-harness tasks: lm_sumz .*, no_such_task_xyz") as e:
    harness.run_harness(run, ["lm_sumz", TASK, "no_such_task_xyz"], include_path=task_dir)
  assert "\n" not in str(e.value)
  assert "did you mean lm_sums?" in str(e.value)


def test_a_task_whose_data_is_not_here_is_a_user_error_offline(run, task_dir, no_network):
  with pytest.raises(UserError, match="a harness task's data cannot be read: .*no_such_dataset"):
    harness.run_harness(run, ["lm_hub_only"], include_path=task_dir)


def test_lm_eval_and_the_harness_agree_on_the_same_examples_and_prompts(run, scorer, docs, task_dir, tmp_path):

  from lm.evals import tasks  # noqa: PLC0415

  (tmp_path / "sums.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  spec = {"kind": "multiple_choice", "examples": "sums.jsonl", "prompt": "{question}", "answer_field": "label"}
  (tmp_path / "sums.json").write_text(json.dumps(spec))
  ours, _ = tasks.evaluate(scorer, tasks.load_task_file(str(tmp_path / "sums.json")))
  out = run_lm("eval", "--workdir", run, "--harness", TASK, "--include-path", task_dir)
  theirs = json.loads(out.stdout.strip().splitlines()[-1])
  assert theirs["task"] == TASK and theirs["n"] == ours["n"] == len(docs)
  for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
    assert theirs[metric] == pytest.approx(ours[metric], abs=1e-12), metric
